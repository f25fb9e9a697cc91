"""The masked-LM pretraining task: M2-BERT on the MDS mixture that `dataprep` builds.

Its config adds `model` (a preset with overrides, or a `save_pretrained` directory to start from) and
`data` (`train.mlm_data.DataConfig`) to the shared sections. A micro-step masks the next padded batch of
the mixture (Hugging Face's 80/10/10 rule, 30% of the tokens) and back-propagates the masked-token loss;
the evaluation is the MLM loss and accuracy on a fixed validation subset, overall and per sample kind
(`train.evaluate_mlm`). The loader's position and each rank's masking generator are checkpointed, so a
resumed run draws the same batches and masks as an uninterrupted one. The export is a `save_pretrained`
directory of `model.M2BertForMaskedLM`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model import M2BertConfig, M2BertForMaskedLM
from train.config import RunConfig
from train.distributed import LaunchEnvironment
from train.evaluate_mlm import evaluate_mlm
from train.mlm_data import DataConfig, MLMMasker, PaddingCollator, eval_samples, manifest_seq_len, train_loader
from train.trainer import Backward, Task

logger = logging.getLogger(__name__)


@dataclass
class ModelSection:
    """The model to train: a preset (with config overrides) or a `save_pretrained` directory to start from."""

    preset: str | None = None
    overrides: dict = field(default_factory=dict)
    init_from: str | None = None
    activation_checkpointing: bool = False

    def __post_init__(self):
        if (self.preset is None) == (self.init_from is None):
            raise ValueError("set exactly one of model.preset and model.init_from")


@dataclass(kw_only=True)
class PretrainConfig(RunConfig):
    """A pretraining run (one YAML file; see configs/pretrain_*.yaml). Keys a file leaves out get the
    M2-BERT long-context pretraining recipe (the `OptimizerConfig` defaults)."""

    SECTION_DEFAULTS = {"training": {"seed": 17, "keep_last": 3}}

    model: ModelSection
    data: DataConfig

    def __post_init__(self):
        if self.training.max_steps is None:
            raise ValueError("training.max_steps is required: the mixture is streamed, epoch after epoch")
        if self.training.epochs is not None:
            raise ValueError("training.epochs does not apply to the streamed mixture; set training.max_steps")


def build_model(section: ModelSection, seq_len: int) -> M2BertForMaskedLM:
    """The masked-LM model on CPU, in training mode (the same initial weights on every rank for the same seed)."""
    if section.init_from is not None:
        model = M2BertForMaskedLM.from_pretrained(section.init_from, **section.overrides)
    else:
        model = M2BertForMaskedLM(M2BertConfig.from_preset(section.preset, **section.overrides))
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"data.seq_len={seq_len} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    if model.config.padding_mode != "masked":
        logger.warning("padding_mode=%r: padded positions influence the others; pretraining expects 'masked'",
                       model.config.padding_mode)
    if section.activation_checkpointing:
        model.gradient_checkpointing_enable()
    return model.train()


class MaskedLMTask(Task):
    """Masked-LM pretraining from the mixture's streams (module docstring)."""

    config_class = PretrainConfig
    name = "pretrain"
    title = "M2-BERT MLM pretraining"
    headline_metrics = ("loss", "accuracy")

    def __init__(self, config: PretrainConfig, env: LaunchEnvironment, device: torch.device):
        self.config = config
        self.device = device
        data, training = config.data, config.training
        self.seq_len = data.seq_len or manifest_seq_len(data.manifest)
        self.total_steps = training.max_steps
        if data.clean_stale_shared_memory:
            from streaming.base.util import clean_stale_shared_memory

            clean_stale_shared_memory()
        self.masker = MLMMasker(data.mlm_probability, seed=training.seed + env.rank + 1)
        self.loader = train_loader(data, training.micro_batch_size, PaddingCollator(self.seq_len, pad_to=data.pad_to))
        self.eval_set = eval_samples(data, data.eval_samples, training.eval_batch_size)
        self.eval_collator = PaddingCollator(self.seq_len, pad_to="longest")
        self.eval_masker = MLMMasker(data.eval_mlm_probability, seed=training.seed + 7919 * (env.rank + 1))
        self.tokens_seen = 0.0
        self.model_config: M2BertConfig | None = None
        self._epoch_iterator = None

    def build_model(self) -> M2BertForMaskedLM:
        model = build_model(self.config.model, self.seq_len)
        self.model_config = model.config
        return model

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next padded batch; a finished epoch starts the next (StreamingDataset reshuffles it)."""
        for _ in range(2):
            if self._epoch_iterator is None:
                self._epoch_iterator = iter(self.loader)
            try:
                return next(self._epoch_iterator)
            except StopIteration:
                self._epoch_iterator = None
        raise RuntimeError(f"{self.config.data.manifest}: the training split yields no full batch of "
                           f"{self.config.training.micro_batch_size} samples per rank")

    def micro_step(self, step: int, index: int, model, backward: Backward) -> dict[str, float]:
        batch = self.masker(self.next_batch())
        inputs = {k: batch[k].to(self.device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels")}
        output = model(**inputs)  # logits only at the masked positions: (n_masked, vocab)
        backward(output.loss)
        targets = inputs["labels"][inputs["labels"] != -100]  # (n_masked,)
        hits = (output.logits.detach().argmax(-1) == targets).sum()
        return {"loss_sum": output.loss.detach().double().item() * targets.numel(), "hits": hits.item(),
                "masked": targets.numel(), "tokens": inputs["attention_mask"].sum().item()}

    def interval_metrics(self, sums: dict[str, float], seconds: float) -> dict[str, float]:
        """Loss and accuracy over the masked tokens; throughput and running count of real (non-pad) tokens."""
        self.tokens_seen += sums["tokens"]
        masked = max(sums["masked"], 1)
        return {"loss": sums["loss_sum"] / masked, "accuracy": sums["hits"] / masked,
                "tokens_per_second": sums["tokens"] / max(seconds, 1e-9), "tokens_seen": self.tokens_seen}

    def evaluate(self, model) -> dict[str, float]:
        return evaluate_mlm(model, self.eval_set, self.eval_collator, self.eval_masker,
                            self.config.training.eval_batch_size, self.device)

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "data": self.loader.state_dict()}

    def rank_state_dict(self) -> dict[str, torch.Tensor]:
        return {"masking_generator": self.masker.generator_state()}

    def load_state_dict(self, state: dict, rank_state: dict[str, torch.Tensor]) -> None:
        self.tokens_seen = float(state["tokens_seen"])
        self.loader.load_state_dict(state["data"])
        if "masking_generator" in rank_state:
            self.masker.set_generator_state(rank_state["masking_generator"])

    def fresh_model(self) -> M2BertForMaskedLM:
        return M2BertForMaskedLM(self.model_config)

    def save_model(self, model: M2BertForMaskedLM, directory: Path) -> None:
        model.save_pretrained(directory)

    def summary(self) -> dict:
        return {"seq_len": self.seq_len}
