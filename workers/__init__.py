"""fanout's workers: the Celery app, its tasks, and the plain functions they wrap."""

from workers.app import app

__all__ = ["app"]
