#!/usr/bin/env bash
#SBATCH --job-name=m2-pretrain-32k
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
# M2-BERT-80M at 32768 tokens: warm start from the 8k model (once), then masked-LM pretraining.
#   sbatch slurm/pretrain_32k.sh [KEY=VALUE config overrides...]
# FROM_8K: the 8k model (default: the 8k run's export); WARM_DIR: where the 32k initialisation goes;
# LENGTH: the new length; Z_MODE: how the Hyena positional features carry over (train/warm_start.py).
set -euo pipefail
# shellcheck source=slurm/launch.sh
source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/launch.sh"

CONFIG=${CONFIG:-configs/pretrain_80M_32k.yaml}
FROM_8K=${FROM_8K:-runs/pretrain-80M-8k/final}
WARM_DIR=${WARM_DIR:-runs/warm-start-32k}
LENGTH=${LENGTH:-32768}
Z_MODE=${Z_MODE:-tile}

if [[ ! -f $WARM_DIR/warm_start.json ]]; then
  launch_once "$PYTHON" -m train.warm_start --from "$FROM_8K" --length "$LENGTH" --z-mode "$Z_MODE" --out "$WARM_DIR"
fi
launch_per_node train.pretrain --config "$CONFIG" --resume model.init_from="$WARM_DIR" "$@"
