#!/usr/bin/env bash
# One machine, all 1 + fed.workers x fed.ranks_per_client ranks, through torchrun (what `fed-ddp run` does, by hand).
#
#   launch/single_node.sh CONFIG [key=value ...]
#
# Env: FED_DDP_PYTHON  the interpreter with fed_ddp installed (default: python on PATH, e.g. an active .venv)
#      TORCHRUN_ARGS   extra torchrun flags, e.g. "--log-dir runs/logs --tee 3"
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: launch/single_node.sh CONFIG [key=value ...]" >&2; exit 2; }
PY=${FED_DDP_PYTHON:-python}

# 1 + fed.workers x fed.ranks_per_client from the config (and a clear error before anything starts if it is invalid)
NPROC=$("$PY" -m fed_ddp.distributed.nodes --nnodes 1 --node-rank 0 "$@")

# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of flags
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" --max-restarts 0 ${TORCHRUN_ARGS:-} \
    -m fed_ddp.train "$@"
