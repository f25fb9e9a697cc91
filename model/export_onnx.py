"""Export an M2-BERT encoder to ONNX (dynamic batch and length) and check it with onnxruntime.

    python -m model.export_onnx --model DIR_OR_PRESET --out encoder.onnx [--check-lengths 64 300]

The graph maps `input_ids` and `attention_mask` (B, L), int64, to `pooler_output` (B, H), float32, and
computes the Hyena filters from their weights for each L (the FFT convolutions become ONNX `DFT` nodes,
opset 20). It follows the model's `padding_mode`: `masked` (the default of our models) removes padding's
influence as `M2BertModel` does; `reference` ignores the mask, so feed it inputs padded to the full length.
After export the embeddings of onnxruntime and PyTorch are compared (fp32, at most 1e-4 apart).

One repair is applied to the exporter's output (torch 2.14 / onnxscript 0.7): the exporter writes irfft as an
inverse one-sided `DFT` whose output it annotates with the L+1 bins of its input spectrum instead of its 2L
real samples, and onnxruntime, which plans buffers from the annotations, then stops ("Shape mismatch
attempting to re-use buffer"). `drop_shape_annotations` removes the intermediate annotations, which
onnxruntime infers correctly itself; see docs/serving.md.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .configuration_m2_bert import PRESET_ALIASES, PRESETS, M2BertConfig
from .modeling_m2_bert import ForwardPlan, M2BertModel

logger = logging.getLogger("model.export_onnx")

OPSET = 20  # DFT with a dynamic length input
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "pooler_output"


class OnnxEncoder(nn.Module):
    """What the graph computes: `M2BertModel(...).pooler_output` through the PyTorch reference, with the FFT
    size 2L written symbolically (the model's `fast_fft_size` is a Python loop over L, which a dynamic-length
    graph cannot hold; any size of at least 2L gives the same outputs in `masked` mode, and `reference`
    mode uses 2L)."""

    def __init__(self, model: M2BertModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        keep = attention_mask[:, None, :].float() if self.model.config.padding_mode == "masked" else None
        plan = ForwardPlan(length=length, fft_size=2 * length, keep=keep, kernel_implementation="torch")
        h = self.model.embeddings(input_ids, None)  # (B, L, H)
        for layer in self.model.layers:
            h = layer(h, plan)
        return self.model.pooler(h)  # (B, H)


def drop_shape_annotations(onnx_model) -> int:
    """Drop the graph's intermediate shape annotations (see the module docstring), which onnxruntime then
    infers itself; returns how many there were."""
    count = len(onnx_model.graph.value_info)
    del onnx_model.graph.value_info[:]
    return count


def export(model: M2BertModel, path: Path, sample_length: int = 64) -> Path:
    """Write `model`'s encoder to `path` as ONNX (batch and length dynamic, up to the model's length)."""
    import onnx

    if model.pooler is None:
        raise ValueError("this M2BertModel has no pooler (an MLM checkpoint's encoder): nothing to export")
    encoder = OnnxEncoder(model).eval()
    sample_length = min(sample_length, model.config.max_position_embeddings)
    input_ids = torch.randint(1000, 2000, (2, sample_length))
    attention_mask = torch.ones_like(input_ids)
    batch = torch.export.Dim("batch", min=1)
    length = torch.export.Dim("length", min=2, max=model.config.max_position_embeddings)
    dynamic = {name: {0: batch, 1: length} for name in INPUT_NAMES}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Traced with autograd on, so that the filters take their uncached path (the inference cache is keyed
    # by the FFT size, which is symbolic here) and the PyTorch reference path.
    with torch.enable_grad():
        program = torch.onnx.export(encoder, (input_ids, attention_mask), dynamo=True, opset_version=OPSET,
                                    input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                                    dynamic_shapes=dynamic, verbose=False)
    onnx_model = program.model_proto
    logger.info("dropped %d intermediate shape annotations", drop_shape_annotations(onnx_model))
    onnx.save(onnx_model, str(path))
    return path


def session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session for an exported encoder."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(onnx_session, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
    """(B, H) float32 embeddings of a tokenized batch through onnxruntime."""
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    return onnx_session.run([OUTPUT_NAME], feeds)[0]


def check(onnx_session, model: M2BertModel, lengths: list[int], batch: int = 2, seed: int = 0) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's embeddings over random inputs of
    each length (the last row of each batch padded to half its length in masked mode)."""
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for length in lengths:
        input_ids = torch.randint(1000, 30000, (batch, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        if model.config.padding_mode == "masked" and length > 1:
            attention_mask[-1, length // 2:] = 0
            input_ids[-1, length // 2:] = 0
        with torch.no_grad():
            expected = model(input_ids, attention_mask).pooler_output.numpy()
        worst = max(worst, float(np.abs(run(onnx_session, input_ids, attention_mask) - expected).max()))
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="m2-bert-tiny", help="checkpoint directory or preset name")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--check-lengths", type=int, nargs="*", default=[17, 64],
                        help="lengths at which onnxruntime is compared with PyTorch (none: no check)")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript"):  # their INFO lines describe graph rewrites
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.model in PRESETS or args.model in PRESET_ALIASES:
        torch.manual_seed(0)
        model = M2BertModel(M2BertConfig.from_preset(args.model)).eval()
    else:
        model = M2BertModel.from_pretrained(args.model).eval()
    for length in args.check_lengths:
        if not 2 <= length <= model.config.max_position_embeddings:
            parser.error(f"--check-lengths: {length} is outside 2..{model.config.max_position_embeddings}")
    start = time.perf_counter()
    export(model, args.out)
    print(f"exported {args.model} ({model.config.padding_mode} mode) to {args.out} in "
          f"{time.perf_counter() - start:.1f} s ({args.out.stat().st_size / 2**20:.1f} MiB)")
    if args.check_lengths:
        difference = check(session(args.out), model, args.check_lengths)
        print(f"onnxruntime vs PyTorch at lengths {args.check_lengths}: max |difference| {difference:.2e}")
        if difference > args.tolerance:
            raise SystemExit(f"the export differs from PyTorch by {difference:.2e} > {args.tolerance:g}")


if __name__ == "__main__":
    main()
