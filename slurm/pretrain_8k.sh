#!/usr/bin/env bash
#SBATCH --job-name=m2-pretrain-8k
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
# Masked-LM pretraining of M2-BERT-80M at 8192 tokens from random initialisation.
#   sbatch slurm/pretrain_8k.sh [KEY=VALUE config overrides...]
# CONFIG picks another config; NNODES, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT, PYTHON and REPO_DIR
# override what the allocation says (slurm/launch.sh). Always resumes from the run's latest checkpoint,
# so a requeued or resubmitted job continues where it stopped.
set -euo pipefail
# shellcheck source=slurm/launch.sh
source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/launch.sh"

CONFIG=${CONFIG:-configs/pretrain_80M_8k.yaml}
launch_per_node train.pretrain --config "$CONFIG" --resume "$@"
