"""The one direction of imports: between the stages, and between the modules of `model/`.

Stages: `model` imports none of the others; `dataprep` and `eval` never import `train`. Inside `model/` the
modules form layers, each importing only modules of earlier layers, at the top of the file: no cycle, and no
import inside a function to hide one (the one function-level import is of `model.st_module`, whose import of
sentence-transformers costs seconds, by a module above it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("dataprep", "model", "train", "eval")
FORBIDDEN = {"model": {"dataprep", "train", "eval"}, "dataprep": {"train"}, "eval": {"train"}}

# model/ from the bottom up; a module may import the model modules of the layers before its own.
MODEL_LAYERS = [
    {"configuration_m2_bert", "tokenizer", "cpu_ops"},
    {"batching", "ops", "loading"},
    {"kernels"},
    {"modeling_m2_bert"},
    {"st_module", "embed", "auto", "export_onnx"},
    {"encoders"},
    {"__init__"},
]
LAZY_IMPORTS = {("encoders", "st_module")}  # (importer, imported): deferred for import time, not a cycle


def imports(path: Path, package: str) -> list[tuple[str, bool]]:
    """(imported top-level package or `package.module`, at module level?) for every import in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside this package
                base = node.module or ""
                names = [base] if base else [alias.name for alias in node.names]
                found += [(f"{package}.{name.split('.')[0]}", id(node) in top_level) for name in names]
            elif node.module:
                found.append((node.module, id(node) in top_level))
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_stages_import_in_one_direction(stage):
    offending = []
    for path in sorted((REPO / stage).rglob("*.py")):
        for name, _ in imports(path, stage):
            if name.split(".")[0] in FORBIDDEN.get(stage, set()):
                offending.append(f"{path.relative_to(REPO)} imports {name}")
    assert not offending, offending


def test_model_modules_import_only_earlier_layers_at_the_top():
    layer_of = {module: index for index, layer in enumerate(MODEL_LAYERS) for module in layer}
    modules = {p.stem for p in (REPO / "model").glob("*.py")}
    assert modules == set(layer_of), f"modules not placed in a layer: {sorted(modules ^ set(layer_of))}"
    problems = []
    for module in sorted(modules):
        for name, at_top in imports(REPO / "model" / f"{module}.py", "model"):
            if not name.startswith("model."):
                continue
            imported = name.split(".")[1]
            if imported not in layer_of:  # `from . import M2BertModel`: a name the package's __init__ gives
                imported = "__init__"
            if layer_of[imported] >= layer_of[module]:
                problems.append(f"model/{module}.py imports {imported}, which is not below it")
            if not at_top and (module, imported) not in LAZY_IMPORTS:
                problems.append(f"model/{module}.py imports {imported} inside a function")
    assert not problems, problems
