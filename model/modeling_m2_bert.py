"""M2-BERT: BERT with Monarch Mixer sequence mixing and block-diagonal GLU MLPs.

Papers: "Monarch Mixer" (arXiv 2310.12109) and "Benchmarking and Building Long-Context Retrieval Models
with LoCo and M2-BERT" (arXiv 2402.07440). Architecture of the released 80M retrieval models:

    embeddings  = LayerNorm(word + token_type + learned absolute position)
    per layer   a   = SequenceMixer(h)                          # no norm, no residual around it
                h'  = LayerNorm(a + Wo(GELU(gate(a)) * value(a)))  # block-diagonal GLU MLP, post-LN
    pooler      = tanh(dense(h[:, 0]))                           # the retrieval embedding

SequenceMixer(u): in_proj to 3H -> causal depthwise conv (width 3) -> split x1, x2, v ->
    y = LongConv(v * x1) * x2 + ResidualLongConv(u), each long conv a bidirectional Hyena implicit
    filter applied by FFT, with a D skip term; then out_proj.

Parameter names are ours; `model.loading` maps the authors' checkpoint names onto them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import BaseModelOutputWithPooling, MaskedLMOutput

from . import cpu_ops, kernels  # fused CUDA paths when built and usable, the CPU inference path, the reference
from . import loading
from .batching import check_texts, encode_in_batches, pad_rows, padded_length
from .configuration_m2_bert import M2BertConfig
from .ops import block_diagonal_linear, fast_fft_size, fft_long_conv
from .tokenizer import load_tokenizer


def hyena_positional_features(length: int, emb_dim: int) -> torch.Tensor:
    """Initial Hyena positional features z = [t, cos(f w), -sin(f w)]: (1, L, emb_dim)."""
    bands = (emb_dim - 1) // 2
    t = torch.linspace(0, 1, length)[None, :, None]  # (1, L, 1)
    w = 2 * math.pi * torch.arange(length, dtype=torch.float32)[None, :, None] / length  # (1, L, 1)
    f = torch.linspace(1e-4, bands - 1, bands)[None, None]  # (1, 1, bands)
    angle = f * w  # (1, L, bands)
    return torch.cat([t, torch.cos(angle), -torch.sin(angle)], dim=-1)


def hyena_decay_rates(d_model: int, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5,
                      target: float = 1e-2) -> torch.Tensor:
    """Per-channel exponential decay rates of the Hyena modulation: (1, 1, H)."""
    max_decay = math.log(target) / fast_decay_pct
    min_decay = math.log(target) / slow_decay_pct
    return torch.linspace(min_decay, max_decay, d_model)[None, None]


@dataclass(frozen=True)
class ForwardPlan:
    """What every layer of one forward pass shares: the sequence length, the FFT size, the padding mask, the
    kernel implementation, whether it takes the CPU inference path (`model.cpu_ops`) and the precision of
    that path's GEMMs."""

    length: int
    fft_size: int
    keep: torch.Tensor | None  # (B, 1, L) 0/1 in `masked` mode, else None
    kernel_implementation: str = "auto"
    cpu_inference: bool = False
    precision: str = "fp32"


class ImplicitFilterMLP(nn.Module):
    """Hyena's implicit filter: positional features (1, L, E) -> filter values (1, L, H).

    Three Linear+Sin layers (sin(w_mod * freq * x), `freq` shared and passed in) and a bias-free
    output projection.
    """

    def __init__(self, emb_dim: int, order: int, d_model: int, num_inner: int = 2):
        super().__init__()
        self.in_proj = nn.Linear(emb_dim, order)
        self.hidden = nn.ModuleList(nn.Linear(order, order) for _ in range(num_inner))
        self.out_proj = nn.Linear(order, d_model, bias=False)

    def forward(self, z: torch.Tensor, sin_freq: torch.Tensor, w_mod: float) -> torch.Tensor:
        """z: (1, L, E) -> (1, L, H), in float32 whatever the parameters' dtype (see `HyenaFilter._kernel`)."""
        h = torch.sin(w_mod * sin_freq * _float32_linear(self.in_proj, z))
        for layer in self.hidden:
            h = torch.sin(w_mod * sin_freq * _float32_linear(layer, h))
        return _float32_linear(self.out_proj, h)


def _float32_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight.float(), None if layer.bias is None else layer.bias.float())


class HyenaFilter(nn.Module):
    """A bidirectional implicit long-convolution filter with its D skip term (Hyena, arXiv 2302.10866).

    The forward kernel k_fwd and reverse kernel k_rev (each (H, L)) act as
        y[n] = sum_{m<=n} k_fwd[n-m] u[m] + sum_{m>n} k_rev[m-n-1] u[m] + D u[n].
    `z` (trainable positional features) is always loaded from checkpoints, never recomputed.
    """

    def __init__(self, d_model: int, l_max: int, emb_dim: int, order: int, w: float, w_mod: float,
                 bidirectional: bool):
        super().__init__()
        self.w_mod = w_mod
        self.d_skip = nn.Parameter(torch.randn(d_model))  # (H,)
        self.z = nn.Parameter(hyena_positional_features(l_max, emb_dim))  # (1, L, E)
        self.register_buffer("t", torch.linspace(0, 1, l_max)[None, :, None])  # (1, L, 1)
        self.register_buffer("decay_rates", hyena_decay_rates(d_model))  # (1, 1, H)
        self.sin_freq = nn.Parameter(w * torch.ones(1, order))  # one Sin shared by both MLPs
        self.forward_mlp = ImplicitFilterMLP(emb_dim, order, d_model)
        self.reverse_mlp = ImplicitFilterMLP(emb_dim, order, d_model) if bidirectional else None
        self._spectrum_cache: dict = {}

    def _kernel(self, mlp: ImplicitFilterMLP, length: int) -> torch.Tensor:
        """(H, L) in float32, outside autocast, whatever the model's dtype: the filter MLP takes sin() of
        arguments up to ~15 rad, which bfloat16 resolves to ~0.06 rad (a ~20% error in the kernel)."""
        with torch.autocast(self.z.device.type, enabled=False):
            z, t = self.z[:, :length].float(), self.t[:, :length].float()
            decay = torch.exp(-t * self.decay_rates.float().abs())  # (1, L, H)
            h = mlp(z, self.sin_freq.float(), self.w_mod) * decay  # (1, L, H)
        return h[0].transpose(0, 1)  # (H, L)

    def circular_kernel(self, length: int, fft_size: int) -> torch.Tensor:
        """The kernel on a circle of fft_size >= 2*length: k_fwd at the head, reversed k_rev at the tail."""
        if fft_size < 2 * length:
            raise ValueError(f"fft_size {fft_size} must be at least twice the length {length}")
        return self._circular(self._kernel(self.forward_mlp, length),
                              None if self.reverse_mlp is None else self._kernel(self.reverse_mlp, length), fft_size)

    @staticmethod
    def _circular(k_fwd: torch.Tensor, k_rev: torch.Tensor | None, fft_size: int) -> torch.Tensor:
        length = k_fwd.shape[-1]
        kernel = F.pad(k_fwd, (0, fft_size - length))  # (H, N)
        if k_rev is not None:
            kernel = kernel + F.pad(k_rev.flip(-1), (fft_size - length, 0))
        return kernel

    def train(self, mode: bool = True) -> "HyenaFilter":
        # Optimisers may rewrite parameters without autograd seeing it (ZeRO steps copy into flat buffers,
        # leaving storage and version counters unchanged), so every switch between training and evaluation
        # starts from an empty cache.
        self.clear_spectrum_cache()
        return super().train(mode)

    def clear_spectrum_cache(self) -> None:
        """Drop the cached inference kernels and spectra (at 32k positions ~200 MB each per filter)."""
        self._spectrum_cache.clear()

    def _inference_cache(self) -> dict:
        """The cache, emptied first if a parameter changed in place since it was filled."""
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if self._spectrum_cache.get("parameters") != key:
            self._spectrum_cache.clear()
            self._spectrum_cache.update(parameters=key, spectra=OrderedDict())
        return self._spectrum_cache

    def _cached_kernels(self, taps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first `taps` taps of k_fwd and k_rev (each (H, taps)), sliced from one cached kernel per filter:
        a shorter kernel is the head of a longer one. The cached kernel grows by powers of two up to the
        filter's length, so that a few evaluations of the filter MLPs serve every length."""
        cache = self._inference_cache()
        if "kernels" not in cache or cache["kernels"][0].shape[-1] < taps:
            length = min(self.z.shape[1], 1 << max(taps - 1, 0).bit_length())
            cache["kernels"] = tuple(None if mlp is None else self._kernel(mlp, length).float().contiguous()
                                     for mlp in (self.forward_mlp, self.reverse_mlp))
        k_fwd, k_rev = cache["kernels"]
        return k_fwd[:, :taps], None if k_rev is None else k_rev[:, :taps]

    def spectrum(self, length: int, fft_size: int) -> torch.Tensor:
        """rfft of the circular kernel, (H, fft_size//2 + 1), fp32, for inputs of at most `length` positions.

        Without gradients in eval mode, spectra are cached (until a parameter changes in place, `train()` or
        `eval()` is called or the cache is cleared) and keyed by fft_size alone: the circle then holds
        min(fft_size // 2, l_max) taps of each kernel, which give every length up to fft_size // 2 the same
        outputs (a tap longer than the input never meets it), so that batches of nearby lengths share one
        spectrum. Spectra of several sizes are kept while they fit in 1.25 times the memory of one full-length
        spectrum (a long one and short ones), each derived from the cached kernels."""
        if fft_size < 2 * length:
            raise ValueError(f"fft_size {fft_size} must be at least twice the length {length}")
        if self.training or torch.is_grad_enabled():
            return torch.fft.rfft(self.circular_kernel(length, fft_size).float(), n=fft_size)
        spectra = self._inference_cache()["spectra"]
        if fft_size in spectra:
            spectra.move_to_end(fft_size)
            return spectra[fft_size]
        taps = min(fft_size // 2, self.z.shape[1])
        spectra[fft_size] = spectrum = torch.fft.rfft(self._circular(*self._cached_kernels(taps), fft_size))
        # Room for one full-length spectrum and a quarter more: short ones (queries) live beside a long one,
        # two long ones do not.
        budget = 5 * spectrum.element_size() * spectrum.shape[0] * (self.z.shape[1] + 1) // 4
        while len(spectra) > 1 and sum(s.numel() * s.element_size() for s in spectra.values()) > budget:
            spectra.popitem(last=False)
        return spectrum

    def forward(self, u: torch.Tensor, plan: ForwardPlan) -> torch.Tensor:
        """u: (B, H, L) -> (B, H, L)."""
        return fft_long_conv(u, self.spectrum(plan.length, plan.fft_size), self.d_skip, plan.fft_size)


class MonarchMixerSequenceMixer(nn.Module):
    """Gated bidirectional long convolution (the M2 replacement for attention)."""

    def __init__(self, config: M2BertConfig):
        super().__init__()
        h = config.hidden_size
        self.hidden_size = h
        self.in_proj = nn.Linear(h, 3 * h)
        self.short_conv = nn.Conv1d(3 * h, 3 * h, kernel_size=3, groups=3 * h, padding=2)
        filter_args = dict(d_model=h, l_max=config.max_position_embeddings, emb_dim=config.hyena_emb_dim,
                           order=config.hyena_filter_order, w=config.hyena_w, w_mod=config.hyena_w_mod,
                           bidirectional=config.bidirectional)
        self.long_conv = HyenaFilter(**filter_args)
        self.residual_long_conv = HyenaFilter(**filter_args) if config.residual_long_conv else None
        self.out_proj = nn.Linear(h, h)
        self.prepared_weights = cpu_ops.PreparedWeights()  # bf16 / int8 projections of the CPU path

    def train(self, mode: bool = True) -> "MonarchMixerSequenceMixer":
        self.prepared_weights.clear()  # as HyenaFilter.train
        return super().train(mode)

    def forward(self, u: torch.Tensor, plan: ForwardPlan) -> torch.Tensor:
        """u: (B, L, H) -> (B, L, H)."""
        residual = self.residual_long_conv
        if plan.cpu_inference:  # the input projection written channels-first, in the plan's precision
            projected = cpu_ops.linear_channels_first(u, self.in_proj.weight, self.in_proj.bias, plan.precision,
                                                      self.prepared_weights)
        else:
            projected = self.in_proj(u).transpose(1, 2)  # (B, 3H, L)
        y = kernels.monarch_mixer_core(
            projected,
            u.transpose(1, 2),  # (B, H, L)
            self.short_conv.weight,
            self.short_conv.bias,
            self.long_conv.spectrum(plan.length, plan.fft_size),
            self.long_conv.d_skip,
            None if residual is None else residual.spectrum(plan.length, plan.fft_size),
            None if residual is None else residual.d_skip,
            plan.fft_size,
            plan.keep,
            implementation=plan.kernel_implementation,
            cpu_path=plan.cpu_inference,
        )  # (B, H, L)
        if plan.cpu_inference:
            return cpu_ops.linear_from_channels_first(y, self.out_proj.weight, self.out_proj.bias, plan.precision,
                                                      self.prepared_weights)
        return self.out_proj(y.transpose(1, 2))


class BlockDiagonalLinear(nn.Module):
    """Linear map with a block-diagonal weight of `nblocks` blocks, stored as (nblocks, out/n, in/n)."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nblocks, out_features // nblocks, in_features // nblocks))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        bound = 1 / math.sqrt(in_features // nblocks)  # nn.Linear's default, per block
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_diagonal_linear(x, self.weight, self.bias)


class MonarchGLUMLP(nn.Module):
    """State mixer: block-diagonal GLU MLP with a post-LayerNorm residual."""

    def __init__(self, config: M2BertConfig):
        super().__init__()
        n = config.monarch_mlp_nblocks
        self.gate_value_proj = BlockDiagonalLinear(config.hidden_size, 2 * config.intermediate_size, n, bias=False)
        self.out_proj = BlockDiagonalLinear(config.intermediate_size, config.hidden_size, n, bias=True)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.prepared_weights = cpu_ops.PreparedWeights()  # bf16 / int8 blocks of the CPU path

    def train(self, mode: bool = True) -> "MonarchGLUMLP":
        self.prepared_weights.clear()  # as HyenaFilter.train
        return super().train(mode)

    def forward(self, a: torch.Tensor, plan: ForwardPlan) -> torch.Tensor:
        """a: (B, L, H) -> (B, L, H) float32 (a may be bfloat16 on the CPU path)."""
        # out(GELU(gate) * value) with [gate, value] = gate_value_proj(a), each (B, L, I)
        weights = (a, self.gate_value_proj.weight, self.out_proj.weight, self.out_proj.bias)
        if plan.cpu_inference:
            h = cpu_ops.block_diagonal_glu(*weights, precision=plan.precision, prepared=self.prepared_weights)
        else:
            h = kernels.block_diagonal_glu(*weights, implementation=plan.kernel_implementation, cpu_path=False)
        return self.layer_norm(self.dropout(h) + a)


class M2BertLayer(nn.Module):
    def __init__(self, config: M2BertConfig):
        super().__init__()
        self.sequence_mixer = MonarchMixerSequenceMixer(config)
        self.state_mixer = MonarchGLUMLP(config)

    def forward(self, h: torch.Tensor, plan: ForwardPlan) -> torch.Tensor:
        return self.state_mixer(self.sequence_mixer(h, plan), plan)


class M2BertEmbeddings(nn.Module):
    def __init__(self, config: M2BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """input_ids: (B, L) -> (B, L, H)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids) + self.position_embeddings(positions)
        return self.dropout(self.layer_norm(h))


class M2BertPreTrainedModel(nn.Module):
    """Shared weight init and the Hugging Face style `from_pretrained` / `save_pretrained`."""

    config_class = M2BertConfig

    def __init__(self, config: M2BertConfig):
        super().__init__()
        self.config = config

    def _init_weights(self, module: nn.Module) -> None:
        # BERT's init for projections and embeddings; Hyena's implicit-filter MLPs keep PyTorch's default
        # (their Sin activations are tuned to it) and block-diagonal weights keep nn.Linear's per block.
        std = self.config.initializer_range
        if isinstance(module, (MonarchMixerSequenceMixer, M2BertPooler, M2BertMLMHead)):
            for child in module.children():
                if isinstance(child, nn.Linear):
                    nn.init.normal_(child.weight, std=std)
                    if child.bias is not None:
                        nn.init.zeros_(child.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def post_init(self) -> None:
        self.apply(self._init_weights)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def clear_spectrum_caches(self) -> None:
        """Free the Hyena filters' cached inference spectra (they are rebuilt on the next forward)."""
        for module in self.modules():
            if isinstance(module, HyenaFilter):
                module.clear_spectrum_cache()

    def num_parameters(self, exclude_position_tables: bool = False) -> int:
        """Trainable parameters; optionally without the length-dependent position embeddings and z."""
        total = 0
        for name, p in self.named_parameters():
            if exclude_position_tables and (name.endswith("position_embeddings.weight") or name.endswith(".z")):
                continue
            total += p.numel()
        return total

    @classmethod
    def from_pretrained(cls, directory, **config_overrides):
        """Load our `save_pretrained` output or an authors' checkpoint directory (see `model.loading`)."""
        return loading.load_pretrained(cls, directory, **config_overrides)

    def save_pretrained(self, directory) -> None:
        """Write `config.json` and `model.safetensors` (tied weights stored once)."""
        loading.save_pretrained(self, directory)


class M2BertPooler(nn.Module):
    def __init__(self, config: M2BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))  # (B, H): the [CLS] position


class M2BertModel(M2BertPreTrainedModel):
    """The M2-BERT encoder. `pooler_output` is the retrieval embedding (compare with cosine similarity)."""

    def __init__(self, config: M2BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = M2BertEmbeddings(config)
        self.layers = nn.ModuleList(M2BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = M2BertPooler(config) if add_pooling_layer else None
        self.gradient_checkpointing = config.gradient_checkpointing
        self.post_init()

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    def forward_plan(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     precision: str = "fp32") -> ForwardPlan:
        length = input_ids.shape[1]
        max_length = self.config.max_position_embeddings
        if length > max_length:
            raise ValueError(f"input has {length} tokens but this model's maximum length is {max_length}; "
                             "truncate it (encode() does) or use a longer model")
        keep = None
        if self.config.padding_mode == "masked" and attention_mask is not None:
            keep = attention_mask[:, None, :].to(self.embeddings.word_embeddings.weight.dtype)  # (B, 1, L)
        # `reference` mode must reproduce the authors' FFT of exactly 2L; `masked` may use any size >= 2L.
        fft_size = 2 * length if self.config.padding_mode == "reference" else fast_fft_size(2 * length)
        weights = self.embeddings.word_embeddings.weight
        # The CPU path takes float32 weights (its bf16 GEMMs come from `precision`); a model cast to another
        # dtype runs the reference. So does a model in training mode, even without gradients: a no-grad pass
        # there (gradient caching's first pass) must give the numbers its later pass with gradients gives.
        cpu_inference = (not self.training and weights.dtype == torch.float32
                         and kernels.uses_cpu_path(self.config.kernel_implementation, weights))
        cpu_ops.check_precision(precision)
        if precision == "int8" and input_ids.device.type != "cpu":
            raise ValueError(f"precision 'int8' runs on CPU only (the input is on {input_ids.device})")
        if precision != "fp32" and input_ids.device.type == "cpu" and not cpu_inference:
            raise ValueError(f"precision {precision!r} runs on the CPU inference path, which this forward pass "
                             "does not take: it needs eval mode, torch.no_grad() and kernel_implementation auto or cpu")
        return ForwardPlan(length=length, fft_size=fft_size, keep=keep,
                           kernel_implementation=self.config.kernel_implementation, cpu_inference=cpu_inference,
                           precision=precision)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, precision: str = "fp32") -> BaseModelOutputWithPooling:
        """input_ids: (B, L) with L <= max_position_embeddings.

        In `reference` mode the attention mask is ignored, exactly as in the authors' encoder (pad to the
        full length to reproduce their embeddings); in `masked` mode it removes padding's influence.
        `precision` (`fp32`, `bf16` or `int8`: see `model.cpu_ops`) is that of the GEMMs on the CPU inference
        path; on CUDA, `bf16` runs the pass under bf16 autocast.
        """
        plan = self.forward_plan(input_ids, attention_mask, precision)
        autocast = torch.autocast(input_ids.device.type, dtype=torch.bfloat16,
                                  enabled=precision == "bf16" and not plan.cpu_inference)
        with autocast:
            h = self.embeddings(input_ids, token_type_ids)  # (B, L, H)
            for layer in self.layers:
                if self.gradient_checkpointing and self.training:
                    h = checkpoint(layer, h, plan, use_reentrant=False)
                else:
                    h = layer(h, plan)
            pooled = self.pooler(h) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=pooled)

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask` (B, W) for texts, truncated to `max_length` tokens (default and
        at most the model's length) and padded as `padding_mode` needs: to the full length in `reference`
        mode (the released models need it), to the batch's longest text in `masked` mode."""
        model_length = self.config.max_position_embeddings
        max_length = model_length if max_length is None else min(max_length, model_length)
        tokenizer = load_tokenizer()
        if self.config.padding_mode == "reference":
            # The authors' LoCo protocol: tokenize in full, then keep the first max_length tokens (an
            # over-long text loses its final [SEP]), which their released scores were computed with.
            ids = [x[:max_length] for x in tokenizer(list(texts), verbose=False,
                                                     return_attention_mask=False)["input_ids"]]
            width = model_length
        else:
            ids = tokenizer(list(texts), truncation=True, max_length=max_length,
                            return_attention_mask=False)["input_ids"]
            width = padded_length(max(len(x) for x in ids), model_length)
        return pad_rows(ids, width, pad_token_id=0)  # (B, W) each, [PAD] = 0

    def tokenize_ids(self, chunks: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """`tokenize` for texts already cut into token ids (without special tokens, e.g. a document's chunks):
        [CLS] and [SEP] added, padded as `padding_mode` needs. A span too long for the model is a ValueError:
        cutting it is the chunker's job."""
        model_length = self.config.max_position_embeddings
        rows = [load_tokenizer().build_inputs_with_special_tokens(list(ids)) for ids in chunks]
        longest = max(len(row) for row in rows)
        if longest > model_length:
            raise ValueError(f"a chunk of {longest} tokens (special tokens included) is longer than the "
                             f"{model_length} tokens this model reads")
        width = model_length if self.config.padding_mode == "reference" else padded_length(longest, model_length)
        return pad_rows(rows, width, pad_token_id=0)

    def embed(self, texts: list[str], max_length: int | None = None) -> torch.Tensor:
        """(B, H) pooler outputs of texts, differentiable: tokenize + forward on the model's device."""
        features = {k: v.to(self.device) for k, v in self.tokenize(texts, max_length).items()}
        return self(**features).pooler_output

    def encode(self, texts: list[str], batch_size: int = 16, max_length: int | None = None,
               show_progress_bar: bool = False, precision: str | None = None) -> np.ndarray:
        """Embed texts: (N, H) float32 numpy array of pooler outputs, in input order; `precision` `fp32` or
        `bf16` (default: bf16 on CUDA, fp32 on CPU). See `model.batching.encode_in_batches`."""
        return encode_in_batches(self, lambda batch: self.tokenize(batch, max_length),
                                 lambda features, precision: self(**features, precision=precision).pooler_output,
                                 check_texts(texts), batch_size, self.config.hidden_size, show_progress_bar,
                                 description="encode m2-bert", precision=precision)


class M2BertMLMHead(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm -> decoder (weight tied to the word embeddings)."""

    def __init__(self, config: M2BertConfig):
        super().__init__()
        self.transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(F.gelu(self.transform(h))))


class M2BertForMaskedLM(M2BertPreTrainedModel):
    """M2-BERT with the masked-LM head used for pretraining (no pooler, as the authors' model)."""

    def __init__(self, config: M2BertConfig):
        super().__init__(config)
        self.m2_bert = M2BertModel(config, add_pooling_layer=False)
        self.mlm_head = M2BertMLMHead(config)
        self.post_init()
        self.tie_weights()

    # Keys of tensors that alias another one; written once by save_pretrained.
    tied_weight_keys = ("mlm_head.decoder.weight",)

    def tie_weights(self) -> None:
        self.mlm_head.decoder.weight = self.m2_bert.embeddings.word_embeddings.weight

    def gradient_checkpointing_enable(self) -> None:
        self.m2_bert.gradient_checkpointing_enable()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> MaskedLMOutput:
        """Without labels: logits (B, L, V). With labels (B, L), -100 where not masked: `loss` is the mean
        cross-entropy over masked positions and `logits` are only those positions, (n_masked, V), in
        row-major order, since full logits at 32k tokens would cost gigabytes."""
        h = self.m2_bert(input_ids, attention_mask, token_type_ids).last_hidden_state  # (B, L, H)
        if labels is None:
            return MaskedLMOutput(logits=self.mlm_head(h), hidden_states=(h,))
        selected = labels != -100  # (B, L)
        logits = self.mlm_head(h[selected])  # (n_masked, V)
        loss = F.cross_entropy(logits.float(), labels[selected])
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=(h,))
