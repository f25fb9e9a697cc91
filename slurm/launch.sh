# shellcheck shell=bash
# Sourced by the slurm/*.sh job scripts: the job geometry from the Slurm allocation and one launcher per
# node. Every value can be overridden from the environment, e.g.
#   NNODES=2 GPUS_PER_NODE=4 MASTER_PORT=29600 PYTHON=.venv/bin/python sbatch slurm/pretrain_8k.sh
set -euo pipefail

# The repository: where sbatch was run (override with REPO_DIR); relative paths in configs start here.
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO_DIR"
PYTHON=${PYTHON:-python}

# GPUs (one process each) per node: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE ("8" or "h100:8").
slurm_gpus_per_node() {
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n ${SLURM_GPUS_PER_NODE:-} ]]; then
    echo "${SLURM_GPUS_PER_NODE##*:}"
  else
    echo 1
  fi
}

NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(slurm_gpus_per_node)}
# Rendezvous on the allocation's first node.
if [[ -z ${MASTER_ADDR:-} ]]; then
  MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm allocation: set MASTER_ADDR}" | head -n 1)
fi
# A port per job, so that jobs sharing a node do not collide.
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export REPO_DIR PYTHON NNODES GPUS_PER_NODE MASTER_ADDR MASTER_PORT

echo "job ${SLURM_JOB_ID:-local}: ${NNODES} node(s) x ${GPUS_PER_NODE} process(es), rendezvous ${MASTER_ADDR}:${MASTER_PORT}, repo ${REPO_DIR}"

# launch_per_node MODULE [ARGS...]: `srun` starts one torchrun per node; torchrun starts GPUS_PER_NODE
# processes of `python -m MODULE ARGS...` that meet at MASTER_ADDR:MASTER_PORT.
launch_per_node() {
  local module=$1
  shift
  # SLURM_NODEID is expanded inside each task (single quotes), where srun sets it.
  # shellcheck disable=SC2016
  srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c 'exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" \
      --node-rank="$SLURM_NODEID" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" -m "$@"' \
    launch_per_node "$module" "$@"
}

# launch_once COMMAND [ARGS...]: one task on the first node (preparation steps such as the warm start).
launch_once() {
  srun --nodes=1 --ntasks=1 "$@"
}
