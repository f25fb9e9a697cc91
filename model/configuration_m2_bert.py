"""Configuration of M2-BERT (Monarch Mixer BERT).

`M2BertConfig` reads the authors' released `config.json` files unchanged
(`togethercomputer/m2-bert-80M-{2k,8k,32k}-retrieval`, `hazyresearch/M2-BERT-*-Retrieval-Encoder-V1`):
their `model_type` may be "bert" and the M2 switch `monarch_mixer_sequence_mixing` may be absent, so every
M2 key has the default the released models were trained with. Their training-recipe and implementation
keys (`AUTHORS_NON_ARCHITECTURE_KEYS`) are not ours: `model.loading` leaves them out.
"""

from __future__ import annotations

import copy
import math

from transformers import PretrainedConfig

PADDING_MODES = ("reference", "masked")
# Which code runs the Monarch Mixer hot paths (see `model.kernels`): `auto` (the fused CUDA kernels when they
# can run, the CPU inference path of `model.cpu_ops` for CPU tensors without autograd, else the reference),
# always the PyTorch reference (`torch`), or the CUDA kernels (`cuda`) or the CPU path (`cpu`) or an error.
KERNEL_IMPLEMENTATIONS = ("auto", "torch", "cuda", "cpu")
HIDDEN_ACTIVATIONS = ("gelu",)  # GELU (erf), in the GLU gate and the MLM head, as every released model

# Keys of the authors' config.json files that describe their training recipe (the Hyena optimiser groups,
# which our training configs set) or their implementation switch (FlashFFTConv; ours is
# `kernel_implementation`), not the function the model computes.
AUTHORS_NON_ARCHITECTURE_KEYS = ("hyena_wd", "hyena_lr_pos_emb", "long_conv_kernel_learning_rate", "use_flash_fft")
# Settings of the process that runs a model, not of the checkpoint: never written to config.json.
RUNTIME_KEYS = ("kernel_implementation",)

# Allowed ranges of the numeric fields, checked before anything is built. The upper bounds lie far beyond any
# M2-BERT or BERT model; they are there so that a mistyped config.json fails at once, naming its key, instead
# of allocating for minutes first.
INTEGER_RANGES = {
    "vocab_size": (1, 1 << 20),
    "hidden_size": (1, 16384),
    "num_hidden_layers": (1, 256),
    "intermediate_size": (1, 65536),
    "max_position_embeddings": (1, 1 << 20),
    "long_conv_l_max": (1, 1 << 20),
    "type_vocab_size": (1, 1024),
    "hyena_emb_dim": (3, 1023),
    "hyena_filter_order": (1, 16384),
    "monarch_mlp_nblocks": (1, 4096),
}
FLOAT_RANGES = {  # (low, high, whether low itself is allowed)
    "hidden_dropout_prob": (0.0, 1.0, True),
    "layer_norm_eps": (0.0, 1.0, False),
    "initializer_range": (0.0, 10.0, True),
    "hyena_w": (-1e6, 1e6, True),
    "hyena_w_mod": (-1e6, 1e6, True),
}
BOOLEAN_KEYS = ("monarch_mixer_sequence_mixing", "bidirectional", "residual_long_conv", "hyena_training_additions",
                "use_glu_mlp", "use_monarch_mlp", "use_positional_encodings", "pool_all", "gradient_checkpointing")

# The 80M architecture shared by every released retrieval model; only the length differs.
_M2_BERT_80M = dict(
    vocab_size=30528,
    hidden_size=768,
    num_hidden_layers=12,
    intermediate_size=3072,
    hyena_filter_order=128,
    monarch_mlp_nblocks=4,
)

PRESETS: dict[str, dict] = {
    "m2-bert-80M-128": dict(_M2_BERT_80M, max_position_embeddings=128),
    "m2-bert-80M-2k": dict(_M2_BERT_80M, max_position_embeddings=2048),
    "m2-bert-80M-8k": dict(_M2_BERT_80M, max_position_embeddings=8192),
    "m2-bert-80M-32k": dict(_M2_BERT_80M, max_position_embeddings=32768),
    # Same structure at a width that trains in seconds on a CPU (as the conformance fixtures).
    "m2-bert-tiny": dict(
        vocab_size=30528,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        hyena_filter_order=32,
        monarch_mlp_nblocks=4,
        max_position_embeddings=512,
    ),
}
PRESET_ALIASES = {"128": "m2-bert-80M-128", "2k": "m2-bert-80M-2k", "8k": "m2-bert-80M-8k",
                  "32k": "m2-bert-80M-32k", "tiny": "m2-bert-tiny"}


class M2BertConfig(PretrainedConfig):
    """Hyper-parameters of an M2-BERT encoder.

    The sequence length `max_position_embeddings` is also the Hyena filters' `long_conv_l_max`
    (the authors keep both, always equal). `padding_mode` is ours: `reference` pads every input to
    the full length with [PAD] as the released checkpoints need; `masked` zeroes positions beyond
    each text before every long convolution, so outputs do not depend on how far a batch is padded.
    `kernel_implementation` is ours too, a choice of the runtime (as Hugging Face's attention
    implementation), so exports do not store it; the `M2_KERNELS` environment variable overrides it.
    """

    model_type = "m2_bert"

    def __init__(
        self,
        vocab_size: int = 30528,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        intermediate_size: int = 3072,
        max_position_embeddings: int = 2048,
        long_conv_l_max: int | None = None,
        type_vocab_size: int = 2,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
        pad_token_id: int = 0,
        monarch_mixer_sequence_mixing: bool = True,
        bidirectional: bool = True,
        residual_long_conv: bool = True,
        hyena_emb_dim: int = 5,
        hyena_filter_order: int = 128,
        hyena_w: float = 10.0,
        hyena_w_mod: float = 1.0,
        hyena_training_additions: bool = False,
        use_glu_mlp: bool = True,
        use_monarch_mlp: bool = True,
        monarch_mlp_nblocks: int = 4,
        use_positional_encodings: bool = True,
        pool_all: bool = False,
        padding_mode: str = "masked",
        kernel_implementation: str = "auto",
        gradient_checkpointing: bool = False,
        **kwargs,
    ):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.long_conv_l_max = max_position_embeddings if long_conv_l_max is None else long_conv_l_max
        self.type_vocab_size = type_vocab_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.monarch_mixer_sequence_mixing = monarch_mixer_sequence_mixing
        self.bidirectional = bidirectional
        self.residual_long_conv = residual_long_conv
        self.hyena_emb_dim = hyena_emb_dim
        self.hyena_filter_order = hyena_filter_order
        self.hyena_w = hyena_w
        self.hyena_w_mod = hyena_w_mod
        self.hyena_training_additions = hyena_training_additions
        self.use_glu_mlp = use_glu_mlp
        self.use_monarch_mlp = use_monarch_mlp
        self.monarch_mlp_nblocks = monarch_mlp_nblocks
        self.use_positional_encodings = use_positional_encodings
        self.pool_all = pool_all
        self.padding_mode = padding_mode
        self.kernel_implementation = kernel_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.validate()

    def validate(self) -> None:
        """Check the type and range of every field, then reject settings this implementation does not
        provide; each error names the key."""
        self._validate_types_and_ranges()
        unsupported = {
            "monarch_mixer_sequence_mixing": (self.monarch_mixer_sequence_mixing, True),
            "use_glu_mlp": (self.use_glu_mlp, True),
            "use_monarch_mlp": (self.use_monarch_mlp, True),
            "use_positional_encodings": (self.use_positional_encodings, True),
            "hyena_training_additions": (self.hyena_training_additions, False),
            "pool_all": (self.pool_all, False),
        }
        for key, (value, supported) in unsupported.items():
            if bool(value) != supported:
                raise ValueError(f"M2BertConfig: {key}={value!r} is not supported (only {supported!r}, "
                                 "as in every released M2-BERT retrieval model)")
        if self.hidden_act not in HIDDEN_ACTIVATIONS:
            raise ValueError(f"M2BertConfig: hidden_act={self.hidden_act!r} is not supported (only "
                             f"{HIDDEN_ACTIVATIONS}, as in every released M2-BERT model)")
        if self.kernel_implementation not in KERNEL_IMPLEMENTATIONS:
            raise ValueError(f"M2BertConfig: kernel_implementation={self.kernel_implementation!r}; expected one "
                             f"of {KERNEL_IMPLEMENTATIONS}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"M2BertConfig: padding_mode={self.padding_mode!r}; expected one of {PADDING_MODES}")
        if self.long_conv_l_max != self.max_position_embeddings:
            raise ValueError(f"M2BertConfig: long_conv_l_max ({self.long_conv_l_max}) must equal "
                             f"max_position_embeddings ({self.max_position_embeddings})")
        for key, divisor in (("hidden_size", self.monarch_mlp_nblocks),
                             ("intermediate_size", self.monarch_mlp_nblocks)):
            if getattr(self, key) % divisor:
                raise ValueError(f"M2BertConfig: {key}={getattr(self, key)} is not divisible by "
                                 f"monarch_mlp_nblocks={divisor}")

    def _validate_types_and_ranges(self) -> None:
        for key, (low, high) in INTEGER_RANGES.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"M2BertConfig: {key} must be an integer, got {value!r}")
            if not low <= value <= high:
                raise ValueError(f"M2BertConfig: {key}={value} is out of range [{low}, {high}]")
        for key, (low, high, low_allowed) in FLOAT_RANGES.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"M2BertConfig: {key} must be a finite number, got {value!r}")
            if not (low <= value if low_allowed else low < value) or not value < high:
                raise ValueError(f"M2BertConfig: {key}={value} is out of range "
                                 f"{'[' if low_allowed else '('}{low}, {high})")
        for key in BOOLEAN_KEYS:
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"M2BertConfig: {key} must be true or false, got {getattr(self, key)!r}")
        for key in ("hidden_act", "padding_mode", "kernel_implementation"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"M2BertConfig: {key} must be a string, got {getattr(self, key)!r}")
        if self.hyena_emb_dim % 2 == 0:
            raise ValueError(f"M2BertConfig: hyena_emb_dim={self.hyena_emb_dim} must be odd (a time feature and "
                             "pairs of cosine and sine features)")
        pad = self.pad_token_id
        if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < self.vocab_size:
            raise ValueError(f"M2BertConfig: pad_token_id={pad!r} must be an integer in [0, vocab_size="
                             f"{self.vocab_size})")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "M2BertConfig":
        """A named architecture: `m2-bert-80M-{128,2k,8k,32k}` or `m2-bert-tiny` (short aliases too)."""
        key = PRESET_ALIASES.get(name, name)
        if key not in PRESETS:
            raise KeyError(f"unknown M2-BERT preset {name!r}; known: {sorted(PRESETS)} "
                           f"or aliases {sorted(PRESET_ALIASES)}")
        kwargs = copy.deepcopy(PRESETS[key])
        kwargs.update(overrides)
        return cls(**kwargs)
