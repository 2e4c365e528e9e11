"""fanout: fan a batch of work out to Celery workers over Redis, and get it back in input order.

::

    import fanout

    @fanout.task
    def score(record: dict) -> float: ...

    outcome = fanout.map(score, records)       # blocks; results in input order
    outcome.results, outcome.errors            # errors by index, with the reason
    job = fanout.submit(score, records)        # returns at once
    for index, value in job.as_completed(): ...

    @fanout.task(fold=fanout.Fold(tally, initial=Counter))   # folded as it goes:
    def words(line: str) -> list[str]: ...                    # fanout.map(words, lines).reduced

Workers import the modules that define tasks: ``FANOUT_IMPORTS=myjobs fanout worker``.
"""

from orchestrator.jobs import DEFAULT_TIMEOUT, Failure, Job, Outcome, Progress
from orchestrator.plan import BatchSize
from orchestrator.send import map, submit
from workers.core import FanoutTask, task
from workers.errors import (
    ConfigError,
    FanoutError,
    InfrastructureError,
    InputError,
    ItemError,
    ResultsTooLarge,
    RunTimeout,
    TransientError,
    UnknownJob,
    WaitInsideTask,
)
from workers.folding import Fold

__all__ = [
    "DEFAULT_TIMEOUT",
    "BatchSize",
    "ConfigError",
    "Failure",
    "FanoutError",
    "FanoutTask",
    "Fold",
    "InfrastructureError",
    "InputError",
    "ItemError",
    "Job",
    "Outcome",
    "Progress",
    "ResultsTooLarge",
    "RunTimeout",
    "TransientError",
    "UnknownJob",
    "WaitInsideTask",
    "map",
    "submit",
    "task",
]
