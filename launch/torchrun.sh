#!/usr/bin/env bash
# moetrain under torchrun, on one node or many.
#
#   launch/torchrun.sh [launcher options] [--] [--config FILE] [group.key=value ...]
#
# Single node (standalone rendezvous on a free local port):
#   launch/torchrun.sh --nproc-per-node 8 --config configs/X.yaml parallel.ep=8
# Multi-node: run the SAME command on every node (c10d rendezvous; node ranks are assigned by
# the rendezvous, so no --node-rank is needed; the endpoint is any one node's address:port):
#   launch/torchrun.sh --nnodes 4 --nproc-per-node 8 --rdzv-endpoint node0:29500 \
#       --rdzv-id myjob --max-restarts 3 --config configs/X.yaml checkpoint.resume=auto
# Elastic: --nnodes MIN:MAX starts as soon as MIN nodes joined (and restarts on membership change).
#
# Launcher options (environment variable in brackets; options win):
#   --nproc-per-node N   processes per node, one per GPU [NPROC_PER_NODE; default: number of
#                        visible GPUs, else 2]
#   --nnodes N|MIN:MAX   nodes [NNODES; default 1]
#   --rdzv-endpoint H:P  c10d rendezvous host:port, required when nnodes != 1 [RDZV_ENDPOINT]
#   --rdzv-id ID         job id shared by all nodes [RDZV_ID; default $SLURM_JOB_ID, else
#                        moetrain-<endpoint>: two jobs with one id count as one job (checkpoint.dir
#                        lock takeover rules), and two live jobs never share an endpoint]
#   --max-restarts N     restart the worker group up to N times after a failure [MAX_RESTARTS;
#                        default 0]; combine with checkpoint.resume=auto to continue, not redo
#   --rdzv-conf K=V,...  c10d rendezvous options [RDZV_CONF; default torch's], e.g. for elastic
#                        jobs keep_alive_interval=1,keep_alive_max_attempt=3: a dead node leaves
#                        the rendezvous after ~3 s instead of torch's 15 (README "Surviving node
#                        failures")
#   --config FILE        moetrain config [CONFIG; default configs/tiny_cpu.yaml]
#   PYTHON               interpreter [default python3]
#   MOETRAIN_IFNAME      network interface for NCCL and gloo (sets NCCL_SOCKET_IFNAME and
#                        GLOO_SOCKET_IFNAME unless already set)
# Everything else is passed to `python -m moetrain.train` as config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
LAUNCHER=torchrun.sh
# shellcheck source=launch/_common.sh
source launch/_common.sh
PYTHON=${PYTHON:-python3}

default_nproc() {
  local n
  n=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  [ "${n:-0}" -gt 0 ] && echo "$n" || echo 2
}

nproc_per_node=${NPROC_PER_NODE:-}
nnodes=${NNODES:-1}
endpoint=${RDZV_ENDPOINT:-}
rdzv_id=${RDZV_ID:-${SLURM_JOB_ID:-}}
max_restarts=${MAX_RESTARTS:-0}
rdzv_conf=${RDZV_CONF:-}
config=${CONFIG:-configs/tiny_cpu.yaml}
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc-per-node|--nproc_per_node) need "$1" "${2:-}"; nproc_per_node=$2; shift 2 ;;
    --nnodes) need "$1" "${2:-}"; nnodes=$2; shift 2 ;;
    --rdzv-endpoint|--rdzv_endpoint) need "$1" "${2:-}"; endpoint=$2; shift 2 ;;
    --rdzv-id|--rdzv_id) need "$1" "${2:-}"; rdzv_id=$2; shift 2 ;;
    --max-restarts|--max_restarts) need "$1" "${2:-}"; max_restarts=$2; shift 2 ;;
    --rdzv-conf|--rdzv_conf) need "$1" "${2:-}"; rdzv_conf=$2; shift 2 ;;
    --config|-c) need "$1" "${2:-}"; config=$2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [ "${1:-}" = "--config" ] || [ "${1:-}" = "-c" ]; then
  need "$1" "${2:-}"; config=$2; shift 2
fi
nproc_per_node=${nproc_per_node:-$(default_nproc)}

export_ifname

if [ "$nnodes" = 1 ] && [ -z "$endpoint" ]; then
  rdzv=(--standalone)
else
  if [ -z "$endpoint" ]; then
    echo "torchrun.sh: --nnodes $nnodes needs --rdzv-endpoint HOST:PORT (the same on every node)" >&2
    exit 2
  fi
  rdzv_id=${rdzv_id:-moetrain-${endpoint//[^A-Za-z0-9]/-}}
  rdzv=(--rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "$rdzv_id")
  [ -n "$rdzv_conf" ] && rdzv+=(--rdzv-conf "$rdzv_conf")
fi

# Restarted workers must not reuse a dead peer's rendezvous store address (pytorch/pytorch#135712):
# with --max-restarts and gloo, about half the restarts failed with "Connection refused" without it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec "$PYTHON" -m torch.distributed.run --nnodes "$nnodes" --nproc-per-node "$nproc_per_node" \
  "${rdzv[@]}" --max-restarts "$max_restarts" \
  -m moetrain.train --config "$config" "$@"
