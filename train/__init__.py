"""Training stage: masked-LM pretraining (`train.pretrain`), the 8k -> 32k warm start (`train.warm_start`) and
retrieval fine-tuning (`train.finetune`), all under DeepSpeed.

Shared pieces, importable without pulling in torch or DeepSpeed at package import:
`train.config` (YAML configs with command-line overrides), `train.distributed` (process-group and DeepSpeed
set-up, gloo on CPU), `train.optim` (parameter groups and learning-rate schedules), `train.checkpointing`
(resumable DeepSpeed checkpoints and `save_pretrained` exports) and `train.logging_utils` (console,
TensorBoard, JSON-lines metrics and PNG curves). Pretraining's data and evaluation: `train.mlm_data`
(mixture streams, padding, masking), `train.mlm_eval` and `python -m train.evaluate_mlm`.
"""
