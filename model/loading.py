"""Checkpoint import and export for M2-BERT.

Reads our own `save_pretrained` output and every layout the authors released:
  * `pytorch_model.bin` / `model.safetensors` with keys `bert.*` (and `cls.*` for masked-LM checkpoints);
  * Composer checkpoints (`state.model`, keys prefixed `model.`) and DDP/DeepSpeed `module.` prefixes;
  * FlashFFTConv constant buffers (`.flashfft.`) and the unused `classifier.*` head, which are skipped;
  * the one shared Sin `freq` of each Hyena filter stored under six names (checked equal, loaded once),
    and the tied decoder weight stored or not.
Anything else missing, unexpected or mis-shaped is an error naming the keys, and so are tensors that are not
floating point or hold NaN or infinity. The config is checked before anything is read or built, and the
model's size against the memory available before it is allocated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch

from .configuration_m2_bert import AUTHORS_NON_ARCHITECTURE_KEYS, RUNTIME_KEYS, M2BertConfig

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
WEIGHTS_NAMES = (SAFETENSORS_NAME, "pytorch_model.bin", "model.bin", "model.pt", "pytorch_model.pt")
REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                        "max_position_embeddings")

# Authors' name -> our name, for everything outside the encoder layers.
_TOP_LEVEL_NAMES = {
    "bert.embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "bert.embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
    "bert.embeddings.LayerNorm.weight": "embeddings.layer_norm.weight",
    "bert.embeddings.LayerNorm.bias": "embeddings.layer_norm.bias",
    "bert.pooler.dense.weight": "pooler.dense.weight",
    "bert.pooler.dense.bias": "pooler.dense.bias",
    "cls.predictions.transform.dense.weight": "mlm_head.transform.weight",
    "cls.predictions.transform.dense.bias": "mlm_head.transform.bias",
    "cls.predictions.transform.LayerNorm.weight": "mlm_head.layer_norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "mlm_head.layer_norm.bias",
    "cls.predictions.decoder.weight": "mlm_head.decoder.weight",
    "cls.predictions.decoder.bias": "mlm_head.decoder.bias",
}

# Within `bert.encoder.layer.{i}.` -> within `layers.{i}.`
_LAYER_NAMES = {
    "attention.in_linear.weight": "sequence_mixer.in_proj.weight",
    "attention.in_linear.bias": "sequence_mixer.in_proj.bias",
    "attention.short_filter.weight": "sequence_mixer.short_conv.weight",
    "attention.short_filter.bias": "sequence_mixer.short_conv.bias",
    "attention.out_linear.weight": "sequence_mixer.out_proj.weight",
    "attention.out_linear.bias": "sequence_mixer.out_proj.bias",
    "mlp.gated_layers.weight": "state_mixer.gate_value_proj.weight",
    "mlp.wo.weight": "state_mixer.out_proj.weight",
    "mlp.wo.bias": "state_mixer.out_proj.bias",
    "mlp.layernorm.weight": "state_mixer.layer_norm.weight",
    "mlp.layernorm.bias": "state_mixer.layer_norm.bias",
}
_FILTER_MODULES = {"filter_fn": "long_conv", "filter_fn2": "residual_long_conv"}
# Within a Hyena filter. The implicit MLP is an nn.Sequential there: 0, 2, 4 Linear; 1, 3, 5 Sin; 6 Linear.
_FILTER_NAMES = {
    "bias": "d_skip",
    "pos_emb.z": "z",
    "pos_emb.t": "t",
    "modulation.deltas": "decay_rates",
}
_MLP_MODULES = {"implicit_filter": "forward_mlp", "implicit_filter_rev": "reverse_mlp"}
_MLP_LINEARS = {"0": "in_proj", "2": "hidden.0", "4": "hidden.1", "6": "out_proj"}
_SIN_POSITIONS = ("1", "3", "5")

# Constants the authors' files hold that we regenerate or do not have.
_SKIPPED = (re.compile(r"\.flashfft\."), re.compile(r"^classifier\."), re.compile(r"^bert\.embeddings\.position_ids$"))


def authors_to_ours(name: str) -> str | None:
    """Our parameter name for one of the authors' state-dict keys (None: not an M2-BERT key)."""
    if name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[name]
    m = re.fullmatch(r"bert\.encoder\.layer\.(\d+)\.(.+)", name)
    if not m:
        return None
    layer, rest = m.groups()
    prefix = f"layers.{layer}."
    if rest in _LAYER_NAMES:
        return prefix + _LAYER_NAMES[rest]
    m = re.fullmatch(r"attention\.(filter_fn2?)\.(.+)", rest)
    if not m:
        return None
    filt, inner = m.groups()
    prefix += f"sequence_mixer.{_FILTER_MODULES[filt]}."
    if inner in _FILTER_NAMES:
        return prefix + _FILTER_NAMES[inner]
    m = re.fullmatch(r"(implicit_filter(?:_rev)?)\.(\d)\.(weight|bias|freq)", inner)
    if not m:
        return None
    mlp, index, leaf = m.groups()
    if leaf == "freq" and index in _SIN_POSITIONS:
        return prefix + "sin_freq"
    if leaf != "freq" and index in _MLP_LINEARS:
        return prefix + f"{_MLP_MODULES[mlp]}.{_MLP_LINEARS[index]}.{leaf}"
    return None


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} (is this an M2-BERT model directory?)")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(values).__name__}")
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in values]
    if missing:
        raise ValueError(f"{path}: missing required key(s) {missing}")
    return values


def load_config(directory, **overrides) -> M2BertConfig:
    """Config from a model directory. Released checkpoints (no `padding_mode` key) get `reference` mode."""
    directory = Path(directory)
    values = _read_config(directory)
    values.pop("model_type", None)  # "bert" in some released files
    for key in AUTHORS_NON_ARCHITECTURE_KEYS:  # their recipe and implementation switches, not the model
        values.pop(key, None)
    values.setdefault("padding_mode", "reference")
    values.update(overrides)
    try:
        return M2BertConfig(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{directory / CONFIG_NAME}: {err}") from err


def read_state_dict(directory) -> tuple[dict[str, torch.Tensor], Path]:
    """The raw tensors of the first weights file found in `directory`, and its path."""
    directory = Path(directory)
    for name in WEIGHTS_NAMES:
        path = directory / name
        if path.is_file():
            break
    else:
        raise FileNotFoundError(f"{directory}: no weights file (looked for {', '.join(WEIGHTS_NAMES)})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or corrupt files raise many different types
        raise ValueError(f"{path}: cannot read weights ({type(err).__name__}: {err}); "
                         "the file may be truncated or corrupt") from err
    if isinstance(state, dict) and isinstance(state.get("state"), dict) and "model" in state["state"]:
        state = state["state"]["model"]  # Composer checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return state, path


def _strip_prefixes(name: str) -> str:
    for prefix in ("module.", "model."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _is_authors_layout(names) -> bool:
    return any(n.startswith(("bert.", "cls.")) for n in names)


def normalise_state_dict(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Authors' or our keys -> our keys, without the model prefix (`embeddings.*`, `layers.*`, `pooler.*`,
    `mlm_head.*`). Duplicated shared tensors are checked equal and kept once."""
    state = {_strip_prefixes(k): v for k, v in state.items()}
    if not _is_authors_layout(state):
        return {(k[len("m2_bert."):] if k.startswith("m2_bert.") else k): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    first_name: dict[str, str] = {}
    unknown = []
    for name, tensor in state.items():
        if any(p.search(name) for p in _SKIPPED):
            continue
        ours = authors_to_ours(name)
        if ours is None:
            unknown.append(name)
            continue
        if ours in out:
            if out[ours].shape != tensor.shape or not torch.equal(out[ours], tensor):
                raise ValueError(f"{source}: {name} should hold the same shared tensor as {first_name[ours]} "
                                 "but differs")
            continue
        out[ours] = tensor
        first_name[ours] = name
    if unknown:
        raise ValueError(f"{source}: unexpected key(s) not in M2-BERT: {sorted(unknown)[:20]}"
                         + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""))
    return out


def available_memory_bytes() -> int | None:
    """Memory this machine can still give a process (`MemAvailable`), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits_in_memory(cls, config: M2BertConfig, source: Path) -> None:
    """Refuse a config whose model would not fit in memory, before allocating it: the model is built on the
    `meta` device (shapes only, no storage) to count its bytes."""
    with torch.device("meta"):
        shapes = cls(config)
    needed = sum(t.numel() * t.element_size() for t in list(shapes.parameters()) + list(shapes.buffers()))
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise ValueError(f"{source}: the model this config describes needs {needed / 2**30:.1f} GiB for its "
                         f"weights, more than the {available / 2**30:.1f} GiB available (hidden_size="
                         f"{config.hidden_size}, num_hidden_layers={config.num_hidden_layers}, intermediate_size="
                         f"{config.intermediate_size}, max_position_embeddings={config.max_position_embeddings}, "
                         f"vocab_size={config.vocab_size})")


def check_tensor_values(state: dict[str, torch.Tensor], source: Path) -> None:
    """Every tensor floating point (an integer or boolean one would be silently cast) and finite."""
    not_float = [f"{name} ({tensor.dtype})" for name, tensor in state.items() if not tensor.is_floating_point()]
    if not_float:
        raise ValueError(f"{source}: tensor(s) of a non-floating dtype: {not_float[:20]}")
    not_finite = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if not_finite:
        raise ValueError(f"{source}: tensor(s) holding NaN or infinity: {not_finite[:20]}"
                         + (f" and {len(not_finite) - 20} more" if len(not_finite) > 20 else ""))


def content_seed(state: dict[str, torch.Tensor]) -> int:
    """A 64-bit seed from the names and bytes of `state`: the same checkpoint always gives the same seed."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little")


def initialise_pooler(model, seed: int) -> None:
    """The pooler's initial weights (BERT's: normal with `initializer_range`, zero bias) from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        torch.nn.init.normal_(model.pooler.dense.weight, std=model.config.initializer_range, generator=generator)
        model.pooler.dense.bias.zero_()


# What transformers' Auto classes pass to `from_pretrained` besides the directory and its config: Hub
# download and remote-code options, which a local directory does not need.
_AUTO_CLASS_KWARGS = ("_from_auto", "trust_remote_code", "adapter_kwargs", "cache_dir", "force_download",
                      "local_files_only", "proxies", "resume_download", "revision", "token", "use_auth_token",
                      "code_revision", "_commit_hash")


def load_pretrained(cls, directory, config: M2BertConfig | None = None, **config_overrides):
    """Build `cls` (M2BertModel or M2BertForMaskedLM) from a directory; see the module docstring.
    `config` (as `AutoModel.from_pretrained` passes it) replaces the directory's config.json."""
    for key in _AUTO_CLASS_KWARGS:
        config_overrides.pop(key, None)
    directory = Path(directory) / config_overrides.pop("subfolder", "")
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist (M2-BERT loads local directories: "
                                "download a Hub model first, e.g. with `huggingface-cli download`)")
    if config is None:
        config = load_config(directory, **config_overrides)
    elif config_overrides:
        values = {key: value for key, value in config.to_dict().items() if key != "model_type"}
        config = M2BertConfig(**{**values, **config_overrides})
    check_fits_in_memory(cls, config, directory / CONFIG_NAME)
    state, path = read_state_dict(directory)
    state = normalise_state_dict(state, path)
    check_tensor_values(state, path)
    model = cls(config)

    prefix = "m2_bert." if hasattr(model, "m2_bert") else ""
    expected = model.state_dict()
    tied = set(getattr(model, "tied_weight_keys", ()))
    has_mlm_head = any(k.startswith("mlm_head.") for k in state)
    loaded: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in state.items():
        target = name if name.startswith("mlm_head.") else prefix + name
        if target in expected:
            loaded[target] = tensor
        elif not prefix and name.startswith("mlm_head."):
            continue  # a masked-LM checkpoint loaded as an encoder: the head is not needed
        else:
            unexpected.append(name)
    if "mlm_head.decoder.weight" in loaded:
        embedding = loaded.get(prefix + "embeddings.word_embeddings.weight")
        if embedding is not None and not torch.equal(loaded["mlm_head.decoder.weight"], embedding):
            raise ValueError(f"{path}: decoder weight is not tied to the word embeddings")
    missing = [k for k in expected if k not in loaded and k not in tied]
    fresh_pooler = not prefix and has_mlm_head and missing and all(k.startswith("pooler.") for k in missing)
    if fresh_pooler:
        logger.warning("%s is a masked-LM checkpoint without a pooler: the pooler is freshly initialised "
                       "(as when the authors fine-tune a pretrained model), from a seed derived from the "
                       "checkpoint, so every load of it embeds the same", directory)
        missing = []
    mis_shaped = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in loaded.items() if v.shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing key(s) {missing}")
    if unexpected:
        problems.append(f"unexpected key(s) {unexpected}")
    if mis_shaped:
        problems.append(f"wrong shape(s) {mis_shaped}")
    if problems:
        raise ValueError(f"{path}: cannot load into {cls.__name__} ({config.max_position_embeddings} positions, "
                         f"hidden {config.hidden_size}): " + "; ".join(problems))
    model.load_state_dict(loaded, strict=False)
    if fresh_pooler:
        initialise_pooler(model, content_seed(loaded))
    model.eval()
    logger.info("loaded %s from %s (%d tensors, padding_mode=%s)", cls.__name__, path, len(loaded),
                config.padding_mode)
    return model


def save_pretrained(model, directory) -> None:
    """config.json + model.safetensors, tied tensors stored once."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tied = set(getattr(model, "tied_weight_keys", ()))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
    # `model_type: m2_bert` and `architectures` let transformers' Auto classes load it (`model.auto`).
    config = {k: v for k, v in model.config.to_dict().items() if k not in RUNTIME_KEYS}
    config["architectures"] = [type(model).__name__]
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
