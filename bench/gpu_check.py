"""The GPU check: the kernels, a bf16 DeepSpeed pretraining run and the speed figures in one prepared run.

A lent GPU machine (one H200 here: docs/kernels.md, "Checking on a GPU") has minutes, no network and an
image without DeepSpeed or mosaicml-streaming. So everything is prepared here and the machine only
measures:

    python bench/gpu_check.py prepare             # here: builds .gpu_carry/ (wheels for the GPU machine's
                                                  # Python 3.12, the 8k MDS mixture) and checks its size
    python bench/gpu_check.py run --dry-run       # here: every stage on the CPU (imports, carry, paths,
                                                  # the CLI runs with a tiny model), ~5 min on 2 cores
    python3 bench/gpu_check.py run --out "$OUT"   # there: the real run, ~8 min, results in $OUT

`run` executes a declared list of stages in order; each records passed / failed / timeout / skipped with
its error and keeps going. A stage gets at most its own cap and what is left of --budget-s.
Stages (--stages picks some, e.g. to rerun one that failed; carry always runs):

  carry        install the carried wheels the machine lacks into a private folder; import DeepSpeed and
               streaming; read the carried mixture's manifest
  environment  GPU, driver, torch, CUDA, free memory, package versions; the copy-bandwidth and bf16
               matrix-product ceilings
  build        JIT-build the extension for the GPU's architecture (timed), ptxas's register / shared
               memory / spill report of every kernel, and the first-call check of model.kernels
  cuda_tests   pytest -m cuda tests/test_kernels_cuda.py (kernel path against the PyTorch path, forward and
               every gradient, L in {128, 1000, 2048, 8192, 32768}, batch 1 and 8, fp32 and bf16, both
               padding modes; the GLU; the whole model), compute-sanitizer excepted
  pretrain     `python -m train.pretrain --config configs/pretrain_80M_8k.yaml` (bf16, DeepSpeed ZeRO-2,
               one GPU) for --steps steps on the carried mixture: loss, tokens/s, model-FLOP utilisation;
               then starts, in the background, the same run stopped at half way and resumed
  sanitizer    compute-sanitizer memcheck, racecheck and synccheck on a small case (while the resume runs)
  resume       waits for the stopped-and-resumed run: its losses after the checkpoint against the
               uninterrupted run's, compared with the run-to-run spread before it
  benchmarks   bench/kernels.py with the time that is left (its own priority order)

Writes to --out (at most 8 files, as the GPU machine returns): gpu_check.json (everything), gpu_check.png,
gpu_check.log (every stage's output), kernels.json and kernels.png. Working files (builds, checkpoints)
go to --work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent

logger = logging.getLogger("bench.gpu_check")

CARRY = REPO / ".gpu_carry"
TREE_LIMIT_BYTES = 64 * 2**20  # what travels to the GPU machine: tracked + untracked files + carried paths
DEVICE_PYTHON = "3.12"
DEVICE_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64"]
PRETRAIN_CONFIG = "configs/pretrain_80M_8k.yaml"
MIXTURE_SEQ_LEN = 8192
MIXTURE = "mixture-8k"  # in the carry folder


@dataclass(frozen=True)
class Carried:
    """A distribution the GPU machine's image lacks, carried as a wheel for its Python."""

    name: str
    version: str | None = None  # None: the pin in constraints.txt
    imports: tuple[str, ...] = ()  # modules to import after installing (those that need no torch)
    note: str = ""


# What train.pretrain needs there beyond the image (KINDS.md lists the image's packages): DeepSpeed and
# mosaicml-streaming with the dependencies they import. Both are installed without their declared
# dependencies: streaming declares transformers<5 and numpy<2.2, and runs on the image's 5.x and 2.x
# (checked here in a Python with transformers 5 and numpy 2.4; see docs/kernels.md).
CARRIED = (
    Carried("deepspeed", note="built here: PyPI has the sdist only; pure Python, no ops compiled"),
    Carried("hjson", imports=("hjson",)),
    Carried("pydantic", imports=("pydantic",)),
    Carried("pydantic-core", imports=("pydantic_core",)),
    Carried("annotated-types", imports=("annotated_types",)),
    Carried("typing-inspection", imports=("typing_inspection",)),
    Carried("typing-extensions", imports=("typing_extensions",), note="installed only if the image's is older"),
    Carried("mosaicml-streaming"),
    Carried("catalogue", imports=("catalogue",)),
    Carried("python-snappy", imports=("snappy",)),
    Carried("cramjam", imports=("cramjam",)),
    Carried("brotli", imports=("brotli",)),
    Carried("zstd", "1.5.6.1", imports=("zstd",), note="the newest release with a cp312 wheel (the pin has none)"),
)


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraint_pin(name: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        pinned, _, version = line.strip().partition("==")
        if normalized(pinned) == normalized(name):
            return version
    raise KeyError(f"constraints.txt pins no {name}")


def carried_version(item: Carried) -> str:
    return item.version or constraint_pin(item.name)


def wheel_name_version(path: Path) -> tuple[str, str, list[str]]:
    """(normalized name, version, tags) of a wheel file name."""
    from packaging.utils import parse_wheel_filename

    name, version, _, tags = parse_wheel_filename(path.name)
    return normalized(name), str(version), sorted(str(t) for t in tags)


def fits_device_python(tags: list[str]) -> bool:
    """Whether one of a wheel's tags installs on CPython 3.12 for x86-64 manylinux (the GPU machine)."""
    from packaging.tags import cpython_tags, compatible_tags

    version = tuple(int(part) for part in DEVICE_PYTHON.split("."))
    supported = {str(t) for t in cpython_tags(version, platforms=DEVICE_PLATFORMS)}
    supported |= {str(t) for t in compatible_tags(version, platforms=DEVICE_PLATFORMS)}
    return bool(supported & set(tags))


def tree_bytes() -> dict[str, int]:
    """Bytes that travel with a call: tracked and untracked-not-ignored files of this checkout."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    files = [REPO / name for name in listed if name and (REPO / name).is_file()]
    return {"files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# --- prepare (here) ------------------------------------------------------------------------------------------

def prepare(args: argparse.Namespace) -> int:
    """Build the carry folder: one wheel per `CARRIED` distribution for the GPU machine's Python, and the
    8k MDS mixture of the bundled sample; then check the size of what travels."""
    carry = args.carry
    wheels = carry / "wheels"
    staging = carry / "wheels.new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    python = sys.executable
    for item in CARRIED:
        spec = f"{item.name}=={carried_version(item)}"
        if item.name == "deepspeed":
            # --no-build-isolation: DeepSpeed's setup imports torch; the wheel itself is pure Python.
            command = [python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(staging), spec]
        else:
            platforms = [argument for p in DEVICE_PLATFORMS for argument in ("--platform", p)]
            command = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                       DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", str(staging), spec]
        print(f"  {spec}: {' '.join(command[2:4])}", flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stdout[-3000:] + result.stderr[-3000:])
            raise SystemExit(f"could not fetch {spec} for Python {DEVICE_PYTHON}")
    shutil.rmtree(wheels, ignore_errors=True)
    staging.rename(wheels)

    mixture = carry / MIXTURE
    if not (mixture / "manifest.json").is_file() or args.rebuild_mixture:
        shutil.rmtree(mixture, ignore_errors=True)
        print(f"  building {mixture} (python -m dataprep.build_mixture --seq-len {MIXTURE_SEQ_LEN}; ~2 min)",
              flush=True)
        subprocess.run([python, "-m", "dataprep.build_mixture", "--seq-len", str(MIXTURE_SEQ_LEN), "--out",
                        str(mixture)], cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    record = {"wheels": [], "mixture": str(mixture.relative_to(carry)), "mixture_bytes": folder_bytes(mixture),
              "prepared_with": {"python": platform.python_version(), "platform": platform.platform()}}
    for wheel in sorted(wheels.glob("*.whl")):
        name, version, tags = wheel_name_version(wheel)
        notes = [item.note for item in CARRIED if normalized(item.name) == name and item.note]
        record["wheels"].append({"file": wheel.name, "name": name, "version": version, "bytes": wheel.stat().st_size,
                                 "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(), "note": " ".join(notes)})
    (carry / "carry.json").write_text(json.dumps(record, indent=2) + "\n")
    problems = check_carry(carry)
    carried, tree = folder_bytes(carry), tree_bytes()
    total = carried + tree["bytes"]
    print(f"carry folder {carry}: {carried / 2**20:.1f} MiB ({len(record['wheels'])} wheels, mixture "
          f"{record['mixture_bytes'] / 2**20:.1f} MiB); the checkout's other files {tree['bytes'] / 2**20:.1f} MiB; "
          f"together {total / 2**20:.1f} MiB of the {TREE_LIMIT_BYTES // 2**20} MiB limit")
    for problem in problems:
        print(f"problem: {problem}")
    if total > TREE_LIMIT_BYTES:
        print("problem: over the size limit of what travels")
        return 1
    return 1 if problems else 0


def check_carry(carry: Path) -> list[str]:
    """What is wrong with a carry folder (empty list: nothing): missing, duplicated or unusable wheels, a
    missing or wrong mixture."""
    problems = []
    wheels = sorted((carry / "wheels").glob("*.whl"))
    found: dict[str, list[Path]] = {}
    for wheel in wheels:
        name, version, tags = wheel_name_version(wheel)
        found.setdefault(name, []).append(wheel)
        if not fits_device_python(tags):
            problems.append(f"{wheel.name}: no tag installs on CPython {DEVICE_PYTHON} x86-64 manylinux")
    for item in CARRIED:
        copies = found.pop(normalized(item.name), [])
        if not copies:
            problems.append(f"no wheel of {item.name} in {carry / 'wheels'}")
        elif len(copies) > 1:
            problems.append(f"{len(copies)} wheels of {item.name} (pip stops on two): {[w.name for w in copies]}")
        elif wheel_name_version(copies[0])[1] != carried_version(item):
            problems.append(f"{copies[0].name}: expected version {carried_version(item)}")
    problems += [f"{', '.join(w.name for w in extra)}: not in the carry list" for extra in found.values()]
    manifest = carry / MIXTURE / "manifest.json"
    if not manifest.is_file():
        problems.append(f"no mixture manifest at {manifest}")
    else:
        from dataprep.manifest import read_manifest

        try:
            values = read_manifest(manifest)
            if values["seq_len"] != MIXTURE_SEQ_LEN:
                problems.append(f"{manifest}: seq_len {values['seq_len']}, expected {MIXTURE_SEQ_LEN}")
        except Exception as error:
            problems.append(f"{manifest}: {error}")
    return problems


# --- run (there, or --dry-run here) ----------------------------------------------------------------------

class StageError(RuntimeError):
    """A stage's failure, with what it found so far."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class StageSkipped(StageError):
    """A stage that cannot tell anything new after an earlier failure (e.g. kernel tests without a build)."""


@dataclass
class Context:
    """What the stages share: where to write, the child processes' environment, the clock."""

    out: Path
    work: Path
    carry: Path
    dry_run: bool
    budget_deadline: float  # the end of the whole run
    log_path: Path
    deadline: float = math.inf  # the end of the current stage
    env: dict[str, str] = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    background: dict = field(default_factory=dict)
    live: set = field(default_factory=set)  # child processes running now
    kernels_unavailable: str | None = None  # why the extension could not be built, once the build stage failed
    log_lock: threading.Lock = field(default_factory=threading.Lock)

    def remaining(self) -> float:
        """Seconds left to the current stage."""
        return min(self.deadline, self.budget_deadline) - time.monotonic()

    def remaining_in_budget(self) -> float:
        return self.budget_deadline - time.monotonic()

    def end_children(self) -> None:
        for process in list(self.live):
            end_process_group(process)

    def log(self, text: str) -> None:
        with self.log_lock, open(self.log_path, "a", encoding="utf-8", errors="replace") as log:
            log.write(text if text.endswith("\n") else text + "\n")

    def run(self, command: list[str], timeout: float, name: str, env: dict | None = None,
            log_path: Path | None = None) -> tuple[int, str]:
        """Run `command` from the repository root, its output appended to the log (or `log_path`); at
        `timeout` its whole process group is ended (rc 124). Returns (rc, the last 20k characters)."""
        started = time.monotonic()
        header = f"\n===== {name}: {' '.join(command)}\n"
        capture = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        # A session of its own, so that a timeout ends its whole tree (DeepSpeed, compute-sanitizer's target).
        process = subprocess.Popen(command, cwd=REPO, env=env or self.env, stdout=capture, stderr=subprocess.STDOUT,
                                   start_new_session=True, text=True)
        self.live.add(process)
        try:
            rc = process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            end_process_group(process)
            rc = 124
        finally:
            self.live.discard(process)
        capture.seek(0)
        output = capture.read()
        capture.close()
        footer = f"===== {name}: exit {rc} after {time.monotonic() - started:.1f} s\n"
        text = header + truncated(output, 400_000) + footer
        if log_path is None:
            self.log(text)
        else:
            log_path.write_text(text, encoding="utf-8")
        return rc, output[-20_000:]


def end_process_group(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def truncated(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"[... {len(text) - limit} characters left out ...]\n" + text[-limit:]


def python_command(*args: str) -> list[str]:
    return [sys.executable, *args]


# --- stage: carry -----------------------------------------------------------------------------------------------

def installed_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def stage_carry(ctx: Context) -> dict:
    from packaging.version import Version

    problems = check_carry(ctx.carry)
    wheels = {wheel_name_version(w)[0]: w for w in (ctx.carry / "wheels").glob("*.whl")}
    result: dict = {"problems": problems, "installed": [], "kept_from_image": {}}
    if ctx.dry_run:
        result["device_python_check"] = check_wheels_under_device_python(ctx, wheels)
    else:
        install = []
        for item in CARRIED:
            wheel, have = wheels.get(normalized(item.name)), installed_version(item.name)
            if wheel is None:
                continue
            if have is not None and Version(have) >= Version(carried_version(item)):
                result["kept_from_image"][item.name] = have
            else:
                install.append(wheel)
        site = ctx.work / "site"
        if install:
            rc, output = ctx.run(python_command("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                                "--no-cache-dir", "--upgrade", "--target", str(site),
                                                *map(str, install)), ctx.remaining(), "pip install (carried wheels)")
            if rc != 0:
                raise StageError(f"pip install of the carried wheels exited {rc}: {output[-3000:]}", result)
        result["installed"] = [w.name for w in install]
        ctx.env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
        sys.path.insert(0, str(site))
    script = ("import json, deepspeed, streaming, pydantic\n"
              "from streaming import StreamingDataset, StreamingDataLoader\n"
              "import train.pretrain, model\n"
              "from dataprep.manifest import read_manifest\n"
              f"manifest = read_manifest({str(ctx.carry / MIXTURE / 'manifest.json')!r})\n"
              "print(json.dumps({'deepspeed': deepspeed.__version__, 'streaming': streaming.__version__,"
              " 'pydantic': pydantic.__version__, 'mixture_train_samples': sum(s['splits']['train']['samples']"
              " for s in manifest['streams'])}))\n")
    rc, output = ctx.run(python_command("-c", script), min(120, ctx.remaining()), "import check")
    if rc != 0:
        raise StageError(f"importing DeepSpeed, streaming and train.pretrain failed: {output[-3000:]}", result)
    result["imports"] = json.loads(output.strip().splitlines()[-1])
    if problems:
        raise StageError("; ".join(problems), result)
    return result


def device_python() -> str | None:
    """An interpreter of the GPU machine's Python version here, if any (for --dry-run)."""
    pattern = f".pyenv/versions/{DEVICE_PYTHON}*/bin/python{DEVICE_PYTHON}"
    candidates = [str(p) for p in sorted(Path.home().glob(pattern))]
    candidates += [found for found in [shutil.which(f"python{DEVICE_PYTHON}")] if found]
    for candidate in candidates:  # a pyenv shim is on PATH even when it has no such version to run
        if subprocess.run([candidate, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return candidate
    return None


def check_wheels_under_device_python(ctx: Context, wheels: dict[str, Path]) -> dict:
    """--dry-run: install every carried wheel with a Python of the GPU machine's version into a scratch
    folder and import the modules that need no torch (torch itself is not installed here for it)."""
    interpreter = device_python()
    if interpreter is None:
        return {"skipped": f"no python{DEVICE_PYTHON} here; the wheel tags were checked statically"}
    target = ctx.work / f"site-{DEVICE_PYTHON}"
    shutil.rmtree(target, ignore_errors=True)
    rc, output = ctx.run([interpreter, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--target", str(target), *map(str, wheels.values())], 300,
                         f"pip install under {DEVICE_PYTHON}")
    if rc != 0:
        raise StageError(f"the carried wheels do not install under Python {DEVICE_PYTHON}: {output[-3000:]}")
    modules = [m for item in CARRIED for m in item.imports]
    rc, output = ctx.run([interpreter, "-c", f"import {', '.join(modules)}; print('imported')"], 120,
                         f"imports under {DEVICE_PYTHON}", env=dict(ctx.env, PYTHONPATH=str(target)))
    if rc != 0:
        raise StageError(f"carried modules do not import under Python {DEVICE_PYTHON}: {output[-3000:]}")
    return {"python": interpreter, "installed": len(wheels), "imported": modules}


# --- stage: environment ---------------------------------------------------------------------------------------

PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "deepspeed", "mosaicml-streaming",
            "pydantic", "sentence-transformers", "triton", "pytest", "pytest-timeout")


def command_output(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return (result.stdout + result.stderr).strip()


def stage_environment(ctx: Context) -> dict:
    import torch

    result = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
              "packages": {name: installed_version(name) for name in PACKAGES},
              "nvcc": command_output(["nvcc", "--version"]),
              "compute_sanitizer": command_output(["compute-sanitizer", "--version"]),
              "tmp_free_gib": shutil.disk_usage(tempfile.gettempdir()).free / 2**30}
    smi = command_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,memory.free,"
                          "clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit",
                          "--format=csv,noheader"])
    result["nvidia_smi"] = smi
    if not torch.cuda.is_available():
        if not ctx.dry_run:
            raise StageError("torch sees no CUDA device", result)
        result["gpu"] = None
        return result
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    result["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                     "multiprocessors": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
                     "free_gib": free / 2**30, "total_gib": total / 2**30,
                     "l2_cache_mib": getattr(props, "L2_cache_size", 0) / 2**20,
                     "shared_memory_per_block_optin_kib": getattr(props, "shared_memory_per_block_optin", 0) / 1024}
    from bench.kernels import measure_ceilings

    result["ceilings"] = measure_ceilings(torch.device("cuda"), dry_run=False)
    torch.cuda.empty_cache()
    return result


# --- stage: build -----------------------------------------------------------------------------------------------

BUILD_SCRIPT = """
import json, sys, time, torch
from model import kernels
started = time.perf_counter()
extension = kernels.build_extension(verbose=True)
built = time.perf_counter() - started
print("BUILT", flush=True)
checks = {}
# The first-call check of model.kernels, as a model's first forward pass would run it (auto mode).
for dtype in (torch.float32, torch.bfloat16):
    for length in (1000, 8192, 32768):
        failure = kernels._mixer_agreement(dtype, torch.device("cuda"), length, residual=True, masked=True)
        checks[f"monarch_mixer_core {dtype} L={length}"] = failure or "agrees"
    failure = kernels._glu_agreement(dtype, torch.device("cuda"), (4, 1536, 192), (4, 192, 768), True)
    checks[f"block_diagonal_glu {dtype}"] = failure or "agrees"
print("RESULT " + json.dumps({"build_seconds": built, "module": extension.__file__, "first_call_checks": checks}))
"""

PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def kernel_name(mangled: str) -> str:
    """The `..._kernel` identifier inside an Itanium-mangled name (length-prefixed parts), else the name."""
    for match in re.finditer(r"\d+", mangled):
        part = mangled[match.end():match.end() + int(match.group())]
        if part.endswith("_kernel"):
            return part
    return mangled


def parse_ptxas(text: str) -> list[dict]:
    """Per kernel: registers, static shared memory, stack frame and spills from `ptxas -v` output."""
    kernels, current = [], None
    for line in text.splitlines():
        if (entry := PTXAS_ENTRY.search(line)):
            mangled = entry.group(1)
            current = {"kernel": kernel_name(mangled),
                       "dtype": "bf16" if "BFloat16" in mangled else "fp32", "arch": entry.group(2)}
            kernels.append(current)
        elif current is not None and (frame := PTXAS_FRAME.search(line)):
            current.update(stack_bytes=int(frame.group(1)), spill_stores=int(frame.group(2)),
                           spill_loads=int(frame.group(3)))
        elif current is not None and (used := PTXAS_USED.search(line)):
            current.update(registers=int(used.group(1)), static_smem_bytes=int(used.group(2) or 0))
    return kernels


def gpu_capability() -> tuple[int, int]:
    """The GPU's compute capability; Hopper's (9, 0) for a dry run, which compiles for the H200."""
    import torch

    return torch.cuda.get_device_capability(0) if torch.cuda.is_available() else (9, 0)


def stage_build(ctx: Context) -> dict:
    arch = "".join(map(str, gpu_capability()))
    result: dict = {"arch": f"sm_{arch}"}
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    ptxas_command = [nvcc, "-O3", "-std=c++17", f"-arch=sm_{arch}", "-Xptxas", "-v", "-c", "csrc/kernels.cu",
                     "-Icsrc", "-o", str(ctx.work / "kernels_ptxas.o")]
    report: dict = {}

    def resource_report():  # runs beside the JIT build: the machine has cores to spare
        report["rc"], report["output"] = ctx.run(ptxas_command, min(240, ctx.remaining()), "ptxas resource report",
                                                 log_path=ctx.work / "ptxas.log")

    side = threading.Thread(target=resource_report)
    side.start()
    if ctx.dry_run:
        result["jit_build"] = ("skipped in a dry run (binding.cpp with the torch headers takes minutes on 2 cores; "
                               "tests/test_kernels.py::test_cuda_extension_builds_with_nvcc_for_sm80_and_sm90 "
                               "builds it)")
    else:
        rc, output = ctx.run(python_command("-c", BUILD_SCRIPT), ctx.remaining(), "JIT build + first-call checks")
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        if rc != 0 or not lines:
            side.join()
            if "BUILT" not in output.splitlines():
                ctx.kernels_unavailable = f"the JIT build failed (exit {rc}; see the build stage)"
                raise StageError(f"the JIT build exited {rc}: {output[-4000:]}", result)
            raise StageError(f"the first-call checks exited {rc}: {output[-4000:]}", result)
        result.update(json.loads(lines[-1][len("RESULT "):]))
    side.join()
    ctx.log((ctx.work / "ptxas.log").read_text(errors="replace") if (ctx.work / "ptxas.log").exists() else "")
    if report.get("rc") != 0:
        raise StageError(f"nvcc -Xptxas -v exited {report.get('rc')}: {report.get('output', '')[-3000:]}", result)
    result["kernels"] = parse_ptxas(report["output"])
    disagreements = {k: v for k, v in result.get("first_call_checks", {}).items() if v != "agrees"}
    if disagreements:
        raise StageError(f"first-call checks failed: {disagreements}", result)
    return result


# --- stages: pytest (cuda tests, sanitizer) ---------------------------------------------------------------------

def parse_junit(path: Path) -> dict:
    import xml.etree.ElementTree as ElementTree

    if not path.is_file():
        return {"error": f"{path.name} not written (pytest was stopped or crashed)"}
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        status, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or child.text or "")[:1500]
        cases.append({"test": case.get("name"), "status": status, "seconds": float(case.get("time") or 0),
                      "message": message})
    counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "slowest": sorted(cases, key=lambda c: -c["seconds"])[:8],
            "not_passed": [c for c in cases if c["status"] in ("failed", "error")]}


def run_pytest(ctx: Context, name: str, selection: list[str], per_test_timeout: int) -> dict:
    junit = ctx.work / f"{name}.xml"
    junit.unlink(missing_ok=True)
    command = python_command("-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rfE",
                             f"--junitxml={junit}", f"--timeout={per_test_timeout}", *selection)
    rc, output = ctx.run(command, ctx.remaining(), name)
    result = parse_junit(junit)
    result["exit_code"] = rc
    if "counts" in result and not ctx.dry_run and result["counts"]["passed"] == 0:
        raise StageError("no test passed", result)
    if rc not in (0, 5):  # 5: nothing collected/selected
        failed = ", ".join(c["test"] for c in result.get("not_passed", [])[:10])
        raise StageError(f"pytest exited {rc}{': ' + failed if failed else ''}; {output[-1500:]}", result)
    return result


def stage_cuda_tests(ctx: Context) -> dict:
    if ctx.kernels_unavailable:
        raise StageSkipped(ctx.kernels_unavailable)
    return run_pytest(ctx, "cuda_tests", ["tests/test_kernels_cuda.py", "-k", "not compute_sanitizer"], 120)


def stage_sanitizer(ctx: Context) -> dict:
    if ctx.kernels_unavailable:
        raise StageSkipped(ctx.kernels_unavailable)
    return run_pytest(ctx, "sanitizer", ["tests/test_kernels_cuda.py", "-k", "compute_sanitizer"], 100)


# --- stages: pretraining and resume ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PretrainPlan:
    steps: int
    micro_batch: int
    overrides: tuple[str, ...]

    @property
    def stop_after(self) -> int:
        return self.steps // 2


def working_mixture(ctx: Context) -> Path:
    """The carried mixture's manifest in a copy under the work folder: StreamingDataset writes decompressed
    shards next to the compressed ones, which would grow the carry folder."""
    copy = ctx.work / MIXTURE
    if not (copy / "manifest.json").is_file():
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(ctx.carry / MIXTURE, copy, ignore=shutil.ignore_patterns("*.mds"))
    return copy / "manifest.json"


def pretrain_plan(ctx: Context, steps: int) -> PretrainPlan:
    """The pretraining runs' overrides of configs/pretrain_80M_8k.yaml: a few dozen amp_bf16 steps of 8 x 8192
    positions on the carried mixture (a tiny model, 4 steps of one sample on the CPU for --dry-run)."""
    overrides = [f"data.manifest={working_mixture(ctx)}", "training.log_every=1", "training.keep_last=2",
                 "output.tensorboard=false", "training.precision=amp_bf16"]
    if ctx.dry_run:
        steps, micro_batch = 4, 1
        overrides += ["model.preset=m2-bert-tiny", "training.device=cpu", "data.eval_samples=2",
                      "model.overrides={max_position_embeddings: 8192, padding_mode: masked}"]
    else:
        micro_batch = 8
        overrides += ["training.device=cuda", "data.eval_samples=32"]
    overrides += [f"training.max_steps={steps}", f"training.micro_batch_size={micro_batch}",
                  f"training.global_batch_size={micro_batch}", f"training.eval_every={steps}",
                  f"training.checkpoint_every={steps}"]
    return PretrainPlan(steps, micro_batch, tuple(overrides))


def pretrain_command(plan: PretrainPlan, run_dir: Path, *extra: str) -> list[str]:
    return python_command("-m", "train.pretrain", "--config", PRETRAIN_CONFIG, *plan.overrides,
                          f"output.dir={run_dir}", *extra)


def train_records(run_dir: Path) -> dict[int, dict]:
    records = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("split") == "train":
                records[int(record["step"])] = record
    return records


def pretrain_flops_per_position(dry_run: bool) -> float:
    """Model FLOPs of one training step per position: 3 x (encoder forward + the MLM head on the masked
    share of positions); activation checkpointing's recomputation is not counted (model FLOPs)."""
    import yaml

    from bench.kernels import m2_cost_per_token
    from model import M2BertConfig

    config = yaml.safe_load((REPO / PRETRAIN_CONFIG).read_text())
    preset = "m2-bert-tiny" if dry_run else config["model"]["preset"]
    overrides = {**config["model"].get("overrides", {}), "max_position_embeddings": MIXTURE_SEQ_LEN}
    model_config = M2BertConfig.from_preset(preset, **overrides)
    encoder = m2_cost_per_token(model_config, MIXTURE_SEQ_LEN, 2)["flops"]
    hidden, vocab = model_config.hidden_size, model_config.vocab_size
    head = config["data"]["mlm_probability"] * (2 * hidden * hidden + 2 * hidden * vocab)
    return 3 * (encoder + head)


def stage_pretrain(ctx: Context, steps: int) -> dict:
    plan = pretrain_plan(ctx, steps)
    root = ctx.work / "pretrain"
    shutil.rmtree(root, ignore_errors=True)
    full = root / "full"
    if ctx.kernels_unavailable:  # rather than each run building again for minutes, then falling back
        ctx.env["M2_KERNELS"] = "torch"
    started = time.monotonic()
    rc, output = ctx.run(pretrain_command(plan, full), ctx.remaining(), "pretrain (uninterrupted)")
    seconds = time.monotonic() - started
    result: dict = {"command": " ".join(pretrain_command(plan, full)[1:]), "steps": plan.steps,
                    "micro_batch_size": plan.micro_batch, "seq_len": MIXTURE_SEQ_LEN, "wall_seconds": seconds,
                    "data": "the carried MDS mixture (python -m dataprep.build_mixture --seq-len 8192 on the bundled "
                            "sample), read by StreamingDataset",
                    "kernel_path": f"PyTorch ({ctx.kernels_unavailable})" if ctx.kernels_unavailable else "auto",
                    "kernel_log": re.findall(r"(?:INFO|WARNING|ERROR) model\.kernels: [^\r\n]*", output)[:12]}
    # The stopped-and-resumed pair runs in the background, beside the sanitizer stage.
    ctx.background["resume"] = start_resume_pair(ctx, plan, root)
    records = train_records(full)
    result["losses"] = [records[s]["loss"] for s in sorted(records)]
    if rc != 0 or not records:
        raise StageError(f"train.pretrain exited {rc}: {output[-4000:]}", result)
    summary = json.loads((full / "summary.json").read_text())
    result["summary"] = summary
    losses = result["losses"]
    head, tail = statistics.mean(losses[:3]), statistics.mean(losses[-3:])
    result["loss_first_3"], result["loss_last_3"] = head, tail
    # Speed after the first 3 steps (warm-up: the first-call checks, cuFFT plans, allocator growth). Each
    # logged step covers one optimizer step; its seconds are its real tokens over its tokens/s. Positions
    # (padding included, all computed on) per second give the model-FLOP utilisation.
    timed = [records[s] for s in sorted(records)][3:] or list(records.values())
    step_seconds = [tokens_of(records, r) / r["tokens_per_second"] for r in timed if r.get("tokens_per_second")]
    if step_seconds:
        median_step = statistics.median(step_seconds)
        result["median_step_seconds"] = median_step
        result["positions_per_second"] = plan.micro_batch * MIXTURE_SEQ_LEN / median_step
        result["tokens_per_second"] = statistics.median(r["tokens_per_second"] for r in timed)
        flops = pretrain_flops_per_position(ctx.dry_run)
        result["model_flops_per_position"] = flops
        peak = (ctx.results["stages"].get("environment", {}).get("ceilings") or {}).get("bf16_matmul_flops_per_second")
        if peak:
            result["mfu_of_measured_matmul_rate"] = result["positions_per_second"] * flops / peak
        result["mfu_of_datasheet_989_tflops"] = result["positions_per_second"] * flops / 989e12
    if not all(math.isfinite(loss) for loss in losses):
        raise StageError("a training loss is not finite", result)
    # A few dozen steps from random initialisation take the MLM loss well below ln(vocabulary) ~ 10.3; the
    # dry run's 4 steps of one sample prove only that the path runs.
    if not ctx.dry_run and not tail < head - 0.1:
        raise StageError(f"the loss did not fall: {head:.3f} over the first 3 steps, {tail:.3f} over the last 3",
                         result)
    return result


def tokens_of(records: dict[int, dict], record: dict) -> float:
    """Real tokens of one logged step, from the running `tokens_seen`."""
    step = int(record["step"])
    previous = records.get(step - 1, {}).get("tokens_seen", 0.0)
    return record["tokens_seen"] - previous


def start_resume_pair(ctx: Context, plan: PretrainPlan, root: Path) -> dict:
    """Start (in a thread) the run stopped after half the steps and its `--resume`; returns the handle that
    `stage_resume` joins."""
    handle: dict = {"dir": root / "resumed", "plan": plan, "runs": []}

    def work():
        for name, extra in (("stopped", ("--stop-after-steps", str(plan.stop_after))), ("resumed", ("--resume",))):
            rc, output = ctx.run(pretrain_command(plan, handle["dir"], *extra), ctx.remaining_in_budget(),
                                 f"pretrain ({name})", log_path=ctx.work / f"pretrain_{name}.log")
            handle["runs"].append({"name": name, "exit_code": rc, "tail": output[-3000:]})
            if rc != 0:
                return

    handle["thread"] = threading.Thread(target=work, daemon=True)
    handle["thread"].start()
    return handle


def stage_resume(ctx: Context) -> dict:
    handle = ctx.background.get("resume")
    if handle is None:
        raise StageError("the pretrain stage did not start the stopped-and-resumed run")
    handle["thread"].join(timeout=max(ctx.remaining(), 1))
    if handle["thread"].is_alive():
        ctx.end_children()  # the resume pair is the only work running beside this stage
        handle["thread"].join(timeout=30)
    for name in ("stopped", "resumed"):
        log = ctx.work / f"pretrain_{name}.log"
        if log.is_file():
            ctx.log(log.read_text(errors="replace"))
    result: dict = {"runs": [{k: v for k, v in run.items() if k != "tail"} for run in handle["runs"]]}
    if handle["thread"].is_alive():
        raise StageError("the stopped-and-resumed run did not finish in time", result)
    failed = [run for run in handle["runs"] if run["exit_code"] != 0]
    if failed or len(handle["runs"]) < 2:
        raise StageError(f"{failed[0]['name'] if failed else 'resumed'} run failed: "
                         f"{failed[0]['tail'] if failed else 'not run'}", result)
    plan = handle["plan"]
    full, resumed = train_records(ctx.work / "pretrain" / "full"), train_records(handle["dir"])
    summary = json.loads((handle["dir"] / "summary.json").read_text())
    result["resumed_from"] = summary.get("resumed_from")
    def differences(steps):
        return [abs(resumed[s]["loss"] - full[s]["loss"]) for s in steps if s in resumed and s in full]

    before = differences(range(1, plan.stop_after + 1))  # two runs of the same steps
    after = differences(range(plan.stop_after + 1, plan.steps + 1))
    result["losses_full"] = [full[s]["loss"] for s in sorted(full)]
    result["losses_resumed"] = [resumed[s]["loss"] for s in sorted(resumed)]
    result["max_difference_before_checkpoint"] = max(before, default=None)
    result["max_difference_after_resume"] = max(after, default=None)
    if result["resumed_from"] != plan.stop_after or len(after) != plan.steps - plan.stop_after:
        raise StageError(f"resumed from {result['resumed_from']} with {len(after)} later steps logged; expected "
                         f"{plan.stop_after} and {plan.steps - plan.stop_after}", result)
    # Same next losses: within the spread of two runs of the same steps (GPU reductions are not bitwise
    # deterministic), with a floor for bitwise-reproducible devices.
    allowed = 3 * max(before, default=0.0) + 1e-3
    result["allowed_difference"] = allowed
    if max(after) > allowed:
        raise StageError(f"the resumed run's losses differ from the uninterrupted run's by up to {max(after):.4f} "
                         f"(allowed {allowed:.4f})", result)
    return result


# --- stage: benchmarks ----------------------------------------------------------------------------------------

def stage_benchmarks(ctx: Context) -> dict:
    budget = ctx.remaining() - 20  # leave time to write and plot
    if budget < 30:
        raise StageError(f"only {ctx.remaining():.0f} s left")
    out = ctx.out / "kernels.json"
    command = python_command("bench/kernels.py", "--out", str(out), "--time-budget-s", f"{budget:.0f}")
    command += ["--dry-run"] if ctx.dry_run else ["--warmup", "2", "--repeats", "5"]
    if ctx.kernels_unavailable:
        command += ["--systems", "m2-torch", "m2-torch-compile", "sdpa-transformer"]
    rc, output = ctx.run(command, ctx.remaining(), "bench/kernels.py")
    if not out.is_file():
        raise StageError(f"bench/kernels.py exited {rc} before writing {out.name}: {output[-3000:]}")
    result = json.loads(out.read_text())
    if not out.with_suffix(".png").is_file():
        from bench.kernels import plot

        plot(result, out.with_suffix(".png"))
    if rc != 0:
        raise StageError(f"bench/kernels.py exited {rc}: {output[-2000:]}", {"kernels": result})
    return {"kernels": result}


# --- the run ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], dict]
    cap_seconds: float  # at most this long on the GPU machine (also bounded by what is left of the budget)


def stages(pretrain_steps: int) -> list[Stage]:
    return [
        Stage("carry", stage_carry, 60),
        Stage("environment", stage_environment, 45),
        Stage("build", stage_build, 240),
        Stage("cuda_tests", stage_cuda_tests, 180),
        Stage("pretrain", lambda ctx: stage_pretrain(ctx, pretrain_steps), 150),
        Stage("sanitizer", stage_sanitizer, 150),
        Stage("resume", stage_resume, 150),
        Stage("benchmarks", stage_benchmarks, 600),
    ]


def write_results(ctx: Context) -> None:
    path = ctx.out / "gpu_check.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(ctx.results, indent=2, default=str) + "\n")
    temporary.replace(path)


def run(args: argparse.Namespace) -> int:
    import torch

    dry_run = args.dry_run or not torch.cuda.is_available()
    out = args.out or Path(os.environ.get("OUT") or REPO / "runs" / "gpu_check")
    work = args.work or (Path(tempfile.gettempdir()) / ("m2_gpu_check_dry" if dry_run else "m2_gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log_path = out / "gpu_check.log"
    log_path.write_text("")
    started = time.monotonic()
    ctx = Context(out=out, work=work, carry=args.carry, dry_run=dry_run, budget_deadline=started + args.budget_s,
                  log_path=log_path)
    ctx.env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    ctx.env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", TORCH_EXTENSIONS_DIR=str(work / "torch_extensions"),
                   MAX_JOBS=str(os.cpu_count() or 4))
    ctx.env.pop("M2_KERNELS", None)
    if dry_run:
        ctx.env.update(CUDA_VISIBLE_DEVICES="")
    else:
        # One architecture, the same in every stage, so that each finds the first stage's build in the cache.
        ctx.env["TORCH_CUDA_ARCH_LIST"] = ".".join(map(str, gpu_capability()))
    # The carry stage always runs: every later stage needs its imports (and it takes seconds).
    selected = set(args.stages or [s.name for s in stages(args.steps)]) | {"carry"}
    ctx.results = {"issue": 14, "dry_run": dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                   "budget_s": args.budget_s, "command": " ".join(sys.argv), "stages": {}}
    print(f"gpu_check: {'dry run on the CPU' if dry_run else 'GPU run'}, budget {args.budget_s:.0f} s, "
          f"out {out}, work {work}", flush=True)

    def stop(signum, frame):  # the caller's time limit: end the children (in sessions of their own) first
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        for stage in stages(args.steps):
            if stage.name not in selected:
                continue
            record: dict = {"status": "skipped"}
            left = ctx.remaining()
            if left < 5:
                record["error"] = "no time left in the budget"
            else:
                stage_started = time.monotonic()
                ctx.deadline = stage_started + (stage.cap_seconds if not dry_run else math.inf)
                print(f"[{time.monotonic() - started:5.0f} s] {stage.name} ...", flush=True)
                try:
                    record = {"status": "passed", **stage.run(ctx)}
                except StageSkipped as error:
                    record = {"status": "skipped", "error": str(error)[:6000], **error.details}
                except StageError as error:
                    record = {"status": "failed", "error": str(error)[:6000], **error.details}
                except Exception as error:  # an unexpected failure of the check itself: record it, go on
                    logger.exception("stage %s", stage.name)
                    record = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:6000]}
                record["seconds"] = time.monotonic() - stage_started
                if record["status"] == "failed" and ctx.remaining() <= 1:
                    record["status"] = "timeout"
                ctx.deadline = math.inf
            ctx.results["stages"][stage.name] = record
            ctx.results["seconds"] = time.monotonic() - started
            write_results(ctx)
            print(f"[{time.monotonic() - started:5.0f} s] {stage.name}: {record['status']}"
                  + (f" ({record['error'][:300]})" if record.get("error") else ""), flush=True)
    finally:
        ctx.end_children()
        for handle in ctx.background.values():
            handle["thread"].join(timeout=30)
        ctx.end_children()
    plot_report(ctx.results, out / "gpu_check.png")
    write_results(ctx)
    print_summary(ctx.results)
    return 0 if all(r["status"] == "passed" for r in ctx.results["stages"].values()) else 1


def plot_report(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages_run = results["stages"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    status, losses, speed = axes
    names = list(stages_run)
    colours = {"passed": "tab:green", "failed": "tab:red", "timeout": "tab:orange", "skipped": "tab:grey"}
    status.barh(names, [stages_run[n].get("seconds", 0) for n in names],
                color=[colours[stages_run[n]["status"]] for n in names])
    status.invert_yaxis()
    status.set_xlabel("seconds")
    status.set_title("stages (green passed, red failed, orange timeout, grey skipped)", fontsize=9)
    resume = stages_run.get("resume", {})
    pretrain = stages_run.get("pretrain", {})
    full = resume.get("losses_full") or pretrain.get("losses") or []
    if full:
        losses.plot(range(1, len(full) + 1), full, label="uninterrupted", color="tab:blue")
    if resume.get("losses_resumed"):
        resumed = resume["losses_resumed"]
        losses.plot(range(1, len(resumed) + 1), resumed, label="stopped, then --resume", color="tab:orange",
                    linestyle="--")
    losses.set_xlabel("optimizer step")
    losses.set_ylabel("MLM loss")
    title = f"bf16 DeepSpeed pretraining, {'tiny' if results['dry_run'] else '80M'} model at 8k"
    if "positions_per_second" in pretrain:
        title += f": {pretrain['positions_per_second']:.0f} positions/s"
    if "mfu_of_measured_matmul_rate" in pretrain:
        title += f", MFU {100 * pretrain['mfu_of_measured_matmul_rate']:.1f}%"
    losses.set_title(title, fontsize=9)
    if full:
        losses.legend(fontsize=8)
    kernels = stages_run.get("benchmarks", {}).get("kernels", {})
    for system in ("m2-kernels", "m2-torch", "m2-torch-compile", "sdpa-transformer"):
        rows = sorted((r for r in kernels.get("forward", []) if r["system"] == system), key=lambda r: r["length"])
        if rows:
            speed.plot([r["length"] for r in rows], [r["tokens_per_second"] for r in rows], marker="o", label=system)
    speed.set_xscale("log", base=2)
    speed.set_yscale("log")
    speed.set_xlabel("sequence length")
    speed.set_ylabel("forward tokens / s")
    speed.set_title(f"forward throughput ({kernels.get('device', 'not measured')})", fontsize=9)
    if kernels.get("forward"):
        speed.legend(fontsize=8)
    fig.suptitle(f"GPU check ({'dry run on the CPU' if results['dry_run'] else 'GPU'}, {results['started']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(results: dict) -> None:
    print(f"\n{'stage':<12} {'status':<8} {'seconds':>8}  notes")
    for name, record in results["stages"].items():
        notes = record.get("error", "")[:160]
        if name == "cuda_tests" or name == "sanitizer":
            notes = f"{record.get('counts')} " + notes
        elif name == "pretrain" and "loss_first_3" in record:
            mfu = record.get("mfu_of_measured_matmul_rate", record.get("mfu_of_datasheet_989_tflops", 0))
            notes = (f"loss {record['loss_first_3']:.3f} -> {record['loss_last_3']:.3f}, "
                     f"{record.get('positions_per_second', 0):.0f} positions/s, MFU {100 * mfu:.1f}% " + notes)
        elif name == "resume" and record.get("max_difference_after_resume") is not None:
            notes = (f"max |loss difference| after resume {record['max_difference_after_resume']:.2e} "
                     f"(allowed {record.get('allowed_difference', math.nan):.2e}) " + notes)
        elif name == "build" and "build_seconds" in record:
            notes = f"JIT build {record['build_seconds']:.0f} s " + notes
        print(f"{name:<12} {record['status']:<8} {record.get('seconds', 0):>8.1f}  {notes}")
    kernels = results["stages"].get("benchmarks", {}).get("kernels")
    if kernels:
        print(f"\n{'system':<18} {'length':>6} {'batch':>5} {'tokens/s':>12} {'%copy-bw':>9} {'%matmul':>8}")
        for r in kernels.get("forward", []):
            print(f"{r['system']:<18} {r['length']:>6} {r['batch']:>5} {r['tokens_per_second']:>12.0f} "
                  f"{100 * r['fraction_of_copy_bandwidth']:>8.1f}% {100 * r['fraction_of_matmul_rate']:>7.1f}%")
        for r in kernels.get("finetune", []):
            print(f"fine-tuning step {r['system']:<18} L={r['length']}: {r['seconds']:.3f} s, peak "
                  f"{r['peak_memory_gib'] if r['peak_memory_gib'] is None else round(r['peak_memory_gib'], 1)} GiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="build the carry folder here")
    prep.add_argument("--carry", type=Path, default=CARRY)
    prep.add_argument("--rebuild-mixture", action="store_true")
    check = commands.add_parser("run", help="run the stages (on the GPU machine, or --dry-run here)")
    check.add_argument("--out", type=Path, default=None, help="results folder (default $OUT, else runs/gpu_check)")
    check.add_argument("--work", type=Path, default=None, help="scratch folder (builds, checkpoints)")
    check.add_argument("--carry", type=Path, default=CARRY)
    check.add_argument("--budget-s", type=float, default=500.0, help="wall-clock budget for all stages")
    check.add_argument("--steps", type=int, default=40, help="pretraining steps (the resume stops at half)")
    check.add_argument("--stages", nargs="+", choices=[s.name for s in stages(0)], default=None)
    check.add_argument("--dry-run", action="store_true", help="the same stages on the CPU (automatic without a GPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    # Run as `python bench/gpu_check.py`: import the project's packages from the repository root, not
    # bench/ (whose dataprep.py would stand in for the dataprep package).
    sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
    sys.exit(main())
