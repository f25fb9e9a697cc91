"""CPU encoding speed and fidelity of M2-BERT in every inference mode, measured side by side in one process.

Speed (80M model, random weights, `masked` mode, batch 1): forward tokens/s on a full-length input at each
length, and the time to embed one 32-token query, for
  * `torch fp32`: today's PyTorch reference path (`kernel_implementation="torch"`), the baseline;
  * `cpu fp32`, `cpu bf16`, `cpu int8`: the CPU inference path (`model.cpu_ops`) with its GEMMs in each
    precision;
  * `onnx fp32`: the `python -m model.export_onnx` graph in onnxruntime.
The variants run interleaved (each repeat runs every variant once; medians reported) after warm-up passes
on the query and a fill of the filter caches at the full length. On a shared 2-core machine a 32k forward
takes minutes, so beyond 8k tokens the defaults time one pass of the fp32 and bf16 variants
(`--long-variants`), and onnxruntime, whose DFT makes it several times slower than PyTorch here, runs up to
`--onnx-max-length`. Each row also gives the cosine of its full-length embedding to the
baseline's, and the query's cost against padding the query to the full length (the baseline's full-length
forward: a `reference`-mode query costs exactly that).

Fidelity on real text (`--quality`): the cosine of every embedding to fp32 and LoCo nDCG@10 on the bundled
QMSum test split, per precision, for all-MiniLM-L6-v2 and for a fine-tuned tiny M2 (`--finetuned-tiny DIR`,
else one fine-tuned here with configs/finetune_tiny_m2_qmsum.yaml from a random tiny M2, ~2 minutes).

    python bench/encode.py --out bench/results/encode.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model import M2BertConfig, M2BertModel
from model.batching import padded_length

logger = logging.getLogger("bench.encode")
REPO = Path(__file__).resolve().parents[1]
BASELINE = "torch fp32"
M2_VARIANTS = {"torch fp32": ("torch", "fp32"), "cpu fp32": ("cpu", "fp32"), "cpu bf16": ("cpu", "bf16"),
               "cpu int8": ("cpu", "int8")}
ONNX = "onnx fp32"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def make_runner(model: M2BertModel, variant: str, onnx_session):
    """A function (input_ids, attention_mask) -> (B, H) float32 tensor running `variant`."""
    if variant == ONNX:
        from model.export_onnx import run

        return lambda ids, mask: torch.from_numpy(run(onnx_session, ids, mask))
    implementation, precision = M2_VARIANTS[variant]

    def forward(ids, mask):
        model.config.kernel_implementation = implementation  # read by every forward pass
        return model(ids, mask, precision=precision).pooler_output

    return forward


def timed(runner, *inputs) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = runner(*inputs)
    return time.perf_counter() - start, out


def fill_filter_caches(model: M2BertModel, length: int) -> None:
    """What a first full-length forward would leave in the filter caches, without running one."""
    fft_size = model.forward_plan(torch.zeros((1, length), dtype=torch.long), None).fft_size
    for layer in model.layers:
        for hyena in (layer.sequence_mixer.long_conv, layer.sequence_mixer.residual_long_conv):
            if hyena is not None:
                hyena.spectrum(length, fft_size)


@torch.no_grad()
def bench_length(preset: str, repeats: int, query_tokens: int, onnx_dir: Path | None, threads: int,
                 variants: list[str]) -> dict:
    torch.manual_seed(0)
    model = M2BertModel(M2BertConfig.from_preset(preset, padding_mode="masked")).eval()
    length = model.config.max_position_embeddings
    onnx_session, export_seconds = None, None
    if onnx_dir is not None:
        from model.export_onnx import export, session

        start = time.perf_counter()
        path = export(model, onnx_dir / f"{preset}.onnx")
        export_seconds = time.perf_counter() - start
        onnx_session = session(path, threads=threads)
        variants = variants + [ONNX]
    runners = {v: make_runner(model, v, onnx_session) for v in variants}
    generator = torch.Generator().manual_seed(1)
    full = torch.randint(1000, 30000, (1, length), generator=generator)
    full_mask = torch.ones_like(full)
    query_width = padded_length(query_tokens, length)
    query = torch.zeros((1, query_width), dtype=torch.long)
    query[0, :query_tokens] = torch.randint(1000, 30000, (query_tokens,), generator=generator)
    query_mask = (query != 0).long()

    full_times = {v: [] for v in variants}
    query_times = {v: [] for v in variants}
    outputs = {}
    logger.info("%s: warm-up (load %s)", preset, load_average())
    for variant in variants:  # each path's kernels and FFT plans at the query's shapes
        runners[variant](query, query_mask)
    fill_filter_caches(model, length)
    for repeat in range(repeats):
        for variant in variants:
            seconds, outputs[variant] = timed(runners[variant], full, full_mask)
            full_times[variant].append(seconds)
            for _ in range(3):
                query_times[variant].append(timed(runners[variant], query, query_mask)[0])
            logger.info("%s repeat %d %-10s %.2f s (load %s)", preset, repeat, variant, seconds, load_average())
    baseline_seconds = statistics.median(full_times[BASELINE])
    rows = []
    for variant in variants:
        seconds = statistics.median(full_times[variant])
        query_seconds = statistics.median(query_times[variant])
        cosine = torch.nn.functional.cosine_similarity(outputs[variant], outputs[BASELINE]).item()
        rows.append({"preset": preset, "length": length, "variant": variant, "full_length_seconds": seconds,
                     "tokens_per_second": length / seconds, "speedup_over_baseline": baseline_seconds / seconds,
                     "cosine_to_baseline": cosine, "query_tokens": query_tokens, "query_width": query_width,
                     "query_seconds": query_seconds,
                     "pad_to_length_over_query": baseline_seconds / query_seconds,
                     "all_full_length_seconds": full_times[variant]})
    return {"rows": rows, "onnx_export_seconds": export_seconds}


# --- fidelity on real text -------------------------------------------------------------------------

def finetune_tiny(workdir: Path) -> Path:
    """A tiny M2 fine-tuned on QMSum with configs/finetune_tiny_m2_qmsum.yaml (from a random tiny M2)."""
    from model import M2BertForMaskedLM

    torch.manual_seed(0)
    base = workdir / "tiny-base"
    M2BertForMaskedLM(M2BertConfig.from_preset("m2-bert-tiny")).save_pretrained(base)
    output = workdir / "finetune-tiny"
    command = [sys.executable, "-m", "train.finetune", "--config", str(REPO / "configs" / "finetune_tiny_m2_qmsum.yaml"),
               f"model.name_or_path={base}", f"output.dir={output}"]
    logger.info("fine-tuning a tiny M2 (about two minutes): %s", " ".join(command))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return Path(json.loads((output / "summary.json").read_text())["export"])


def ndcg_at_10(task, query_vectors: np.ndarray, document_vectors: np.ndarray) -> float:
    from eval.metrics import HEADLINE_METRIC, evaluate_run

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    scores = unit(query_vectors) @ unit(document_vectors).T  # (Q, D)
    pids = list(task.documents)
    run = {qid: {pids[j]: float(scores[i, j]) for j in np.argsort(-scores[i])[:100]}
           for i, qid in enumerate(task.queries)}
    return 100 * evaluate_run(task.qrels, run)[HEADLINE_METRIC]


@torch.no_grad()
def embed_with(encoder, texts: list[str], precision: str, batch_size: int = 8) -> np.ndarray:
    """Embeddings in `precision` through the encoder's inference forward (int8 included, which encode()
    does not offer)."""
    chunks = []
    encoder.eval()
    for start in range(0, len(texts), batch_size):
        features = encoder.tokenize(texts[start:start + batch_size])
        chunks.append(encoder.inference_forward(features, precision).float().numpy())
    return np.concatenate(chunks)


def bench_quality(finetuned_tiny: Path | None, workdir: Path) -> list[dict]:
    from eval.data import load_tasks
    from model.encoders import load_encoder

    task = load_tasks(split="test")[0]
    texts = {"queries": list(task.queries.values()), "documents": list(task.documents.values())}
    encoders = {"all-MiniLM-L6-v2": load_encoder("all-MiniLM-L6-v2"),
                "tiny M2 fine-tuned": load_encoder(str(finetuned_tiny or finetune_tiny(workdir)))}
    rows = []
    for name, encoder in encoders.items():
        vectors = {p: {k: embed_with(encoder, v, p) for k, v in texts.items()} for p in ("fp32", "bf16", "int8")}
        for precision, embedded in vectors.items():
            cosines = np.concatenate([
                (embedded[k] * vectors["fp32"][k]).sum(1)
                / np.linalg.norm(embedded[k], axis=1) / np.linalg.norm(vectors["fp32"][k], axis=1) for k in texts])
            ndcg = ndcg_at_10(task, embedded["queries"], embedded["documents"])
            rows.append({"model": name, "task": task.name, "precision": precision, "texts": len(cosines),
                         "min_cosine_to_fp32": float(cosines.min()), "mean_cosine_to_fp32": float(cosines.mean()),
                         "ndcg_at_10": ndcg})
            logger.info("%s %s: min cosine %.5f, nDCG@10 %.2f", name, precision, cosines.min(), ndcg)
    return rows


# --- report ------------------------------------------------------------------------------------------

def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(variants)
    for k, variant in enumerate(variants):
        mine = [next((r for r in rows if r["preset"] == p and r["variant"] == variant), None) for p in presets]
        x = np.arange(len(presets)) + k * width
        axes[0].bar(x, [r["speedup_over_baseline"] if r else 0 for r in mine], width, label=variant)
        axes[1].bar(x, [r["pad_to_length_over_query"] if r else 0 for r in mine], width, label=variant)
    for ax, title in zip(axes, ("full-length forward: speed-up over torch fp32",
                                f"{rows[0]['query_tokens']}-token query: times cheaper than padding to L")):
        ax.set_xticks(np.arange(len(presets)) + 0.4 - width / 2, [f"{r} tokens" for r in
                      [next(x["length"] for x in rows if x["preset"] == p) for p in presets]])
        ax.set_title(title)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[1].set_yscale("log")
    axes[1].axhline(100, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["m2-bert-80M-2k", "m2-bert-80M-8k", "m2-bert-80M-32k"])
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per variant up to 8k tokens")
    parser.add_argument("--long-repeats", type=int, default=1, help="timed passes per variant beyond 8k tokens")
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--long-variants", nargs="+", default=["torch fp32", "cpu fp32", "cpu bf16"],
                        choices=list(M2_VARIANTS), help="the PyTorch variants timed beyond 8k tokens")
    parser.add_argument("--onnx-max-length", type=int, default=2048,
                        help="longest model run through onnxruntime (0: none)")
    parser.add_argument("--quality", action="store_true", help="also measure fidelity on real text")
    parser.add_argument("--finetuned-tiny", type=Path, default=None, help="a fine-tuned tiny M2 for --quality")
    parser.add_argument("--out", type=Path, default=Path("bench/results/encode.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("onnx_ir", "onnxscript"):  # their INFO lines describe graph rewrites
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    load_before = load_average()

    rows, export_seconds, quality = [], {}, None
    with tempfile.TemporaryDirectory() as workdir:
        for preset in args.presets:
            length = M2BertConfig.from_preset(preset).max_position_embeddings
            long = length > 8192
            result = bench_length(preset, args.long_repeats if long else args.repeats, args.query_tokens,
                                  Path(workdir) if length <= args.onnx_max_length else None, args.threads,
                                  args.long_variants if long else list(M2_VARIANTS))
            rows += result["rows"]
            export_seconds[preset] = result["onnx_export_seconds"]
        if args.quality:
            quality = bench_quality(args.finetuned_tiny, Path(workdir))
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": args.threads,
                          "torch": torch.__version__, "load_average_before": load_before,
                          "load_average_after": load_average()},
              "command": " ".join(sys.argv), "baseline": BASELINE, "rows": rows,
              "onnx_export_seconds": export_seconds, "quality": quality}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))

    print(f"load average before {load_before}, after {result['machine']['load_average_after']} "
          f"({args.threads} threads)")
    print(f"{'length':>6} {'variant':<11} {'tok/s':>7} {'x base':>7} {'cosine':>9} {'query ms':>9} {'pad-L/query':>11}")
    for r in rows:
        print(f"{r['length']:>6} {r['variant']:<11} {r['tokens_per_second']:>7.0f} {r['speedup_over_baseline']:>7.2f} "
              f"{r['cosine_to_baseline']:>9.6f} {r['query_seconds'] * 1000:>9.1f} {r['pad_to_length_over_query']:>11.0f}")
    for q in quality or []:
        print(f"{q['model']:<20} {q['precision']:<5} min cosine {q['min_cosine_to_fp32']:.5f}  "
              f"nDCG@10 {q['ndcg_at_10']:.2f}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
