"""The one error hierarchy shared by workers and orchestrator.

Every constructor passes its arguments on to ``Exception`` so that the result
backend (JSON) can rebuild the exception on the other side.
"""

from __future__ import annotations


class FanoutError(Exception):
    """Root of every error fanout raises on purpose."""


class ConfigError(FanoutError):
    """The environment holds a setting fanout cannot use."""


class InputError(FanoutError, ValueError):
    """Input that cannot become work items, refused before anything is sent; the message names the culprit."""


class ItemError(FanoutError):
    """One input item cannot be processed; the rest of the run goes on.

    ``reason`` is a sentence a person can read; ``item`` names the input.
    """

    def __init__(self, item: str, reason: str) -> None:
        super().__init__(item, reason)
        self.item = item
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.item}: {self.reason}"


class InvalidNumber(ItemError):
    """A doubling input that is not an integer."""


class ImageError(ItemError):
    """An image that cannot be read, decoded or written."""


class TransientError(FanoutError):
    """A failure that may go away if the work is tried again (I/O, network)."""


class InfrastructureError(FanoutError):
    """The run cannot proceed: Redis unreachable, no worker, timed out."""


class RunTimeout(InfrastructureError):
    """The wait for a run's fan-in ran out."""


class NotJSON(ItemError):
    """An item's input or result that JSON cannot carry."""


class WorkerKilled(ItemError):
    """An item that took its worker process down every time it ran (a poison item)."""


class BadTask(FanoutError, TypeError):
    """A function or option that cannot be made a fanout task."""


class WaitInsideTask(FanoutError, RuntimeError):
    """A blocking wait (``fanout.map``, ``Job.wait``, ``Job.results``, ``Job.as_completed``) called
    inside a task: it would need the worker pool processes that the calling task holds.

    A RuntimeError, as Celery's own refusal of ``result.get()`` inside a task is.
    """


class UnknownJob(FanoutError):
    """No job with that id is in Redis: never sent there, or expired."""


class ResultsTooLarge(FanoutError):
    """``Outcome.results`` of a job too big to hold as one list: iterate instead."""


class JobStopped(FanoutError):
    """The job was stopped (cancelled, or its failure budget exceeded) while a batch of it ran.

    ``reason`` is the job's stop reason, which every item not run fails with.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
