"""The ``fanout`` command line, split as rq's is: the shared options and exit codes
(options.py), running a job: send, follow, show (running.py), and the commands (commands.py)."""

from orchestrator.cli.commands import main

__all__ = ["main"]
