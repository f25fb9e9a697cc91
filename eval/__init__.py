"""The LoCo long-document retrieval benchmark: data, models' protocols, search, metrics and reports.

`python -m eval.loco` scores models on LoCo and LongEmbed (docs/eval.md); `python -m eval.needle` makes
needle and passkey tasks; `eval.mteb_models` and `eval.mteb_tasks` run our models and LoCoV1 under
mteb's evaluator. Other stages read LoCo-format data through `load_tasks`.
"""

from .data import LOCOV1_TASKS, LocoDataError, LocoTask, list_tasks, load_tasks

__all__ = ["LOCOV1_TASKS", "LocoDataError", "LocoTask", "list_tasks", "load_tasks"]
