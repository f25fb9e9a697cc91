#!/usr/bin/env bash
#SBATCH --job-name=m2-eval-loco
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
# LoCo benchmark (python -m eval.loco): every process embeds its shard of the corpus into the shared
# embedding cache, then rank 0 scores (docs/eval.md).
#   sbatch slurm/eval_loco.sh --model runs/finetune-m2-32k/final --data hf --cache-dir .cache/loco-embeddings
# Arguments go to eval.loco unchanged; geometry overrides as in slurm/launch.sh.
set -euo pipefail
# shellcheck source=slurm/launch.sh
source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/launch.sh"

if [[ $# -eq 0 ]]; then
  echo "usage: sbatch slurm/eval_loco.sh ARGS... (passed to python -m eval.loco; e.g. --model DIR --data hf)" >&2
  exit 2
fi
launch_per_node eval.loco "$@"
