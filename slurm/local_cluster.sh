#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests and for trying the batch scripts.
#
#   sudo slurm/local_cluster.sh          # then: sinfo; sbatch --wait slurm/fed_ddp.sbatch CONFIG ...
#
# Debian/Ubuntu, as root. Idempotent and quick when already done: installs slurm-wlm and munge if
# missing (apt-get), writes /etc/slurm/slurm.conf (only if absent or written by this script before),
# creates the munge key, starts munged, slurmctld and slurmd if they are not answering, and waits
# until the node is idle. Exit codes: 0 ready, 77 cannot run here (not root / no apt), 1 failed.
# Never use it on a machine that belongs to a real cluster: it refuses to touch a slurm.conf it did
# not write.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live there; a non-login root shell may lack them

MARK="# written by fed_ddp slurm/local_cluster.sh"
CONF=/etc/slurm/slurm.conf
say() { echo "local_cluster: $*" >&2; }

[ "$(id -u)" = 0 ] || { say "needs root (it installs packages and starts daemons)"; exit 77; }
command -v apt-get >/dev/null && command -v dpkg >/dev/null || { say "needs apt-get/dpkg (Debian or Ubuntu)"; exit 77; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# -- munge: one key, daemon running as user munge ------------------------------------------------
mkdir -p /etc/munge /var/log/munge /var/lib/munge /run/munge
if ! [ -s /etc/munge/munge.key ]; then  # Debian's munge package usually made one already
    mungekey -c -k /etc/munge/munge.key 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /var/log/munge /var/lib/munge /run/munge
chmod 0700 /etc/munge /var/log/munge /var/lib/munge; chmod 0755 /run/munge; chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    runuser -u munge -- munged --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
    munge -n | unmunge >/dev/null || { say "munged does not answer"; exit 1; }
fi

# -- slurm.conf: this host as controller and only compute node -----------------------------------
HOST=$(hostname -s)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
if [ -e "$CONF" ] && ! head -n 1 "$CONF" | grep -qF "$MARK"; then
    say "$CONF exists and was not written by this script; refusing to change it"; exit 1
fi
NEW=$(cat <<EOF
$MARK
ClusterName=fedddp
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
if [ "$(cat "$CONF" 2>/dev/null)" != "$NEW" ]; then
    say "writing $CONF"
    printf '%s\n' "$NEW" > "$CONF"
    CHANGED=1
fi

# -- daemons ----------------------------------------------------------------------------------------
if [ -n "${CHANGED:-}" ] && scontrol ping 2>/dev/null | grep -q UP; then
    say "configuration changed: restarting the daemons (scontrol shutdown)"
    scontrol shutdown || true
    for _ in $(seq 50); do scontrol ping 2>/dev/null | grep -q UP || break; sleep 0.2; done
    sleep 1
fi
if ! scontrol ping 2>/dev/null | grep -q UP; then
    say "starting slurmctld"
    slurmctld
    for _ in $(seq 50); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
fi
state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1; }
if ! [ -e /run/slurm/slurmd.pid ] || ! kill -0 "$(cat /run/slurm/slurmd.pid)" 2>/dev/null; then
    say "starting slurmd"
    slurmd
fi
for _ in $(seq 100); do
    case "$(state)" in
        idle|mixed|allocated|completing) say "ready: node $HOST $(state), $(nproc) CPUs"; exit 0 ;;
        down*|drain*|fail*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.3
done
say "node $HOST is '$(state)', not idle; see /var/log/slurm/slurmd.log and slurmctld.log"
exit 1
