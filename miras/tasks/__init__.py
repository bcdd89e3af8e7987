"""Task generators: MQAR, the six MAD tasks, single-needle retrieval, formal languages, language modelling.

``make_task(task_spec, vocab_size=..., seq_len=..., seed=...)`` builds one; ``TASK`` maps names to classes
(``formal:<language>`` is resolved by the formal family). ``TASK_DEFAULTS`` holds training defaults per family,
chosen so that a recipe at its default size trains in about a minute on 2 CPU cores.
"""

from __future__ import annotations

from typing import Any

from miras.errors import SpecError
from miras.registry import Registry
from miras.tasks.base import IGNORE, Batch, ExampleTask, Task
from miras.tasks.formal import ALIASES, ALPHABET, FormalLanguage
from miras.tasks.mad import MAD_TASKS, mad_protocol, mad_score
from miras.tasks.mqar import MQAR
from miras.tasks.niah import NIAH
from miras.tasks.text import LanguageModeling

TASK: Registry = Registry("task")
for _cls in (MQAR, NIAH, LanguageModeling, *MAD_TASKS.values()):
    TASK.register(_cls.name)(_cls)
for _lang in ALPHABET:
    TASK.register(f"formal:{_lang}")(FormalLanguage)

# training defaults per task family (TrainSpec fields left at None)
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "mqar": {"steps": 300, "batch_size": 32, "lr": 3e-3, "warmup": 30, "eval_every": 100, "eval_batches": 4},
    "mad": {"steps": 400, "batch_size": 32, "lr": 1e-3, "warmup": 40, "eval_every": 100, "eval_batches": 4},
    "niah": {"steps": 400, "batch_size": 32, "lr": 3e-3, "warmup": 40, "eval_every": 100, "eval_batches": 4},
    "formal": {"steps": 400, "batch_size": 32, "lr": 3e-3, "warmup": 40, "eval_every": 100, "eval_batches": 4},
    "lm": {"steps": 300, "batch_size": 16, "lr": 3e-3, "warmup": 30, "eval_every": 100, "eval_batches": 4},
}


def task_family(name: str) -> str:
    return name.split(":", 1)[0]


def make_task(task: Any, *, vocab_size: int, seq_len: int | None = None, seed: int = 0) -> Task:
    """Build the task of a ``TaskSpec`` (or a dict/str) for a model with ``vocab_size`` tokens.

    Raises:
        SpecError: unknown task (with the valid names), bad options, or a vocabulary the model cannot hold.
    """
    from miras.train_spec import TaskSpec

    if not isinstance(task, TaskSpec):
        try:
            task = TaskSpec.model_validate(task)
        except ValueError as err:
            raise SpecError(f"train.task: {err}") from None
    name = task.name
    if name.startswith("formal:"):
        lang = ALIASES.get(name.split(":", 1)[1], name.split(":", 1)[1])
        name = f"formal:{lang}"
    if name not in TASK:
        raise SpecError(f"train.task.name: unknown task, but got name={task.name!r}. {_available()}")
    cls = TASK.get(name)
    kw = {"vocab_size": vocab_size, "seq_len": seq_len, "seed": seed, "difficulty": task.difficulty}
    if cls is FormalLanguage:
        return FormalLanguage(name.split(":", 1)[1], dict(task.options), **kw)
    return cls(dict(task.options), **kw)


def _available() -> str:
    return "Available: " + ", ".join(TASK.kinds()) + "."


__all__ = ["TASK", "TASK_DEFAULTS", "IGNORE", "Batch", "ExampleTask", "Task", "make_task", "mad_protocol", "mad_score",
           "task_family"]
