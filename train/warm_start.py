"""Warm start of a longer M2-BERT from a shorter one (the 8k -> 32k step of the recipe).

    python -m train.warm_start --from runs/pretrain-8k/final --length 32768 --out runs/warm-32k

Every length-independent tensor is copied. The length-dependent ones are rebuilt for the new length L':
  * position embeddings are replicated: row n of the new table is row n mod L of the old one
    (the paper's "extended through replication");
  * each Hyena filter's time grid `t` is recomputed as linspace(0, 1, L') (it is a buffer, never trained),
    so the exponential decay spans the new length;
  * each Hyena filter's trained positional features `z` (1, L, 5) carry over by `--z-mode`:
      - `tile` (default): z'(n) = z(n mod L), the intent of the authors' unfinished snippet. The first L
        lags of every filter see exactly the features they were trained with (only the decay, now spread
        over L', is slower), at the price of echoes of the kernel every L positions, damped by the decay;
      - `interpolate`: linear interpolation along positions onto L' points, z'(n) = z(n (L-1)/(L'-1)).
        With the new `t`, each filter becomes the old one stretched in time, k'(n) ~ k(n L/L'): no echoes,
        but the short lags, where most of a filter's weight lies, are blurred.
    Measured on a 128 -> 512 analogue (docs/pretraining.md), `tile` keeps the MLM loss much closer to the
    source model's, on short and on long samples, hence the default.
The result is a `save_pretrained` directory (plus `warm_start.json` recording how it was made) that a
pretraining config names in `model.init_from`. It is written beside `--out` and renamed into place whole;
`--out` may be new, empty or an earlier warm start (replaced), never the source model, a folder inside or
around it, or any other non-empty folder (refused before anything is read).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from train.files import publish_folder, staging_folder

logger = logging.getLogger("train.warm_start")

Z_MODES = ("tile", "interpolate")


def replicate_rows(table: torch.Tensor, length: int) -> torch.Tensor:
    """(L, H) -> (length, H), row n = table[n mod L]."""
    repeats = -(-length // table.shape[0])
    return table.repeat(repeats, 1)[:length].clone()


def extend_positional_features(z: torch.Tensor, length: int, mode: str) -> torch.Tensor:
    """Hyena positional features (1, L, E) -> (1, length, E) by `interpolate` or `tile` (module docstring)."""
    if mode == "tile":
        return replicate_rows(z[0], length)[None]
    if mode == "interpolate":
        channels_first = z.transpose(1, 2)  # (1, E, L)
        stretched = F.interpolate(channels_first.float(), size=length, mode="linear", align_corners=True)
        return stretched.transpose(1, 2).to(z.dtype).contiguous()  # (1, length, E)
    raise ValueError(f"z mode {mode!r}; expected one of {Z_MODES}")


def warm_start(source, length: int, z_mode: str = "tile"):
    """A new model of the source's class and config at `length` positions, initialised from `source`."""
    old_length = source.config.max_position_embeddings
    if length < old_length:
        raise ValueError(f"--length {length} is shorter than the source model's {old_length} positions")
    config = source.config.__class__.from_dict({**source.config.to_dict(), "max_position_embeddings": length,
                                                "long_conv_l_max": length})
    target = source.__class__(config)
    old_state = source.state_dict()
    new_state = {}
    for name, tensor in target.state_dict().items():
        old = old_state[name]
        if name.endswith("position_embeddings.weight"):
            new_state[name] = replicate_rows(old, length)
        elif name.endswith(".z"):
            new_state[name] = extend_positional_features(old, length, z_mode)
        elif name.endswith(".t"):
            new_state[name] = tensor  # the fresh model's linspace(0, 1, length)
        elif old.shape != tensor.shape:
            raise ValueError(f"{name}: shape {tuple(old.shape)} in the source but {tuple(tensor.shape)} at "
                             f"{length} positions; only position tables should depend on the length")
        else:
            new_state[name] = old
    target.load_state_dict(new_state)
    target.eval()
    return target


def check_output_folder(source: Path, out: Path) -> str | None:
    """Why `--out` would destroy something the user did not hand over to be replaced (None when it would not):
    the source model itself, a folder inside it or containing it, a file, or a non-empty folder that is not an
    earlier warm start (one holding `warm_start.json` is replaced)."""
    source, out = source.resolve(), out.resolve()
    if out == source:
        return f"--out {out} is the --from model itself"
    if source in out.parents:
        return f"--out {out} is inside the --from model {source}"
    if out in source.parents:
        return f"--out {out} contains the --from model {source}"
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file"
    if out.is_dir() and any(out.iterdir()) and not (out / "warm_start.json").is_file():
        return f"--out {out} is a non-empty folder that is not an earlier warm start (no warm_start.json)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", required=True,
                        help="the shorter model: a save_pretrained directory (e.g. a pretraining run's final/)")
    parser.add_argument("--length", type=int, required=True, help="new maximum length, e.g. 32768")
    parser.add_argument("--out", required=True,
                        help="directory for the warm-started model: new, empty or an earlier warm start (replaced)")
    parser.add_argument("--z-mode", choices=Z_MODES, default="tile",
                        help="how the trained Hyena positional features carry over (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    problem = check_output_folder(Path(args.source), out)
    if problem:
        parser.error(f"{problem}; nothing was written. Choose a new --out")

    from model import M2BertForMaskedLM

    source = M2BertForMaskedLM.from_pretrained(args.source)
    model = warm_start(source, args.length, args.z_mode)
    # Built beside --out and renamed into place: a killed warm start leaves no half-written model.
    staging = staging_folder(out.resolve(), "warm-start")
    model.save_pretrained(staging)
    record = {"source": str(Path(args.source).resolve()), "source_length": source.config.max_position_embeddings,
              "length": args.length, "z_mode": args.z_mode,
              "position_embeddings": "replicated", "t": "linspace(0, 1, length)"}
    (staging / "warm_start.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        logger.info("replacing the earlier warm start in %s", out)
    publish_folder(staging, out.resolve())
    print(f"warm-started {source.config.max_position_embeddings} -> {args.length} positions "
          f"(z: {args.z_mode}; {model.num_parameters():,} parameters) written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
