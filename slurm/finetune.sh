#!/usr/bin/env bash
#SBATCH --job-name=m2-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
# Retrieval fine-tuning (train/finetune.py) of a pretrained M2-BERT.
#   sbatch slurm/finetune.sh [KEY=VALUE config overrides...]
# CONFIG picks the config; geometry overrides as in slurm/launch.sh. Resumes from the latest checkpoint.
set -euo pipefail
# shellcheck source=slurm/launch.sh
source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/launch.sh"

CONFIG=${CONFIG:-configs/finetune_m2_32k.yaml}
launch_per_node train.finetune --config "$CONFIG" --resume "$@"
