"""Training stage: masked-LM pretraining (`train.pretrain`), the 8k -> 32k warm start (`train.warm_start`) and
retrieval fine-tuning (`train.finetune`), all under DeepSpeed (docs/architecture.md).

One loop for both: `train.trainer.Trainer` runs a task, `train.mlm_task.MaskedLMTask` (data: `train.mlm_data`;
evaluation: `train.evaluate_mlm`) or `train.retrieval_task.RetrievalTask` (`train.retrieval_examples`,
`train.retrieval_objectives`, `train.losses`). Shared pieces: `train.config` (YAML configs with command-line
overrides and the shared sections), `train.optim` (parameter groups and schedule), `train.distributed`,
`train.checkpointing` (with `train.checkpoint_loading`), `train.files`, `train.logging_utils` and
`train.memory`. Importing the package pulls in neither torch nor DeepSpeed.
"""
