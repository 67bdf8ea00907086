#!/usr/bin/env bash
# Several machines without SLURM: start this once on every machine, with the same CONFIG and overrides.
#
#   host0$ NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=host0:29400 launch/multi_node.sh CONFIG [key=value ...]
#   host1$ NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=host0:29400 launch/multi_node.sh CONFIG [key=value ...]
#
# NNODES         number of machines (each runs one torchrun agent)
# NODE_RANK      0..NNODES-1, distinct per machine: decides how many of the 1 + fed.workers x fed.ranks_per_client ranks
#                this machine runs (spread evenly, lower node ranks take the extra one). Which machine
#                gets rank 0 (the server) is decided by the c10d rendezvous, not by NODE_RANK.
# RDZV_ENDPOINT  host:port of the rendezvous, on one of the machines (usually the first); the agent
#                on that host serves it. The port must be reachable from every machine.
# RDZV_ID        a name shared by the agents of one run (default fed_ddp); change it between runs
#                that reuse an endpoint while an old agent may still be alive.
# FED_DDP_PYTHON interpreter with fed_ddp installed (default: python on PATH)
# TORCHRUN_ARGS  extra torchrun flags
#
# Every machine needs the same code, config and data paths; run.output_dir and the model (or
# model.cache_dir for the tiny base) should be on a shared filesystem: the server rank writes the
# run directory, and every rank loads the base the server located.
set -euo pipefail
usage="usage: NNODES=N NODE_RANK=i RDZV_ENDPOINT=host:port launch/multi_node.sh CONFIG [key=value ...]"
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
for v in NNODES NODE_RANK RDZV_ENDPOINT; do
    [ -n "${!v:-}" ] || { echo "multi_node.sh: $v is not set; $usage" >&2; exit 2; }
done
PY=${FED_DDP_PYTHON:-python}

NPROC=$("$PY" -m fed_ddp.distributed.nodes --nnodes "$NNODES" --node-rank "$NODE_RANK" "$@")

# shellcheck disable=SC2086
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-fed_ddp}" \
    --max-restarts 0 ${TORCHRUN_ARGS:-} -m fed_ddp.train "$@"
