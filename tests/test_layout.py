"""The shape of the package: a small public surface, the engine apart from the jobs that ship
with it, one error hierarchy."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import fanout
import workers.errors


def test_the_public_surface_is_sorted_and_every_name_in_it_imports() -> None:
    # Sorted as ruff keeps it (RUF022): constants, then classes, then functions, each alphabetically.
    kind = lambda name: (0 if name.isupper() else 1 if name[0].isupper() else 2, name)  # noqa: E731
    assert fanout.__all__ == sorted(fanout.__all__, key=kind)
    assert len(set(fanout.__all__)) == len(fanout.__all__)
    for name in fanout.__all__:
        assert getattr(fanout, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from fanout import *", namespace)
    assert set(fanout.__all__) <= set(namespace)


def test_import_fanout_loads_neither_pillow_nor_the_built_in_jobs() -> None:
    # A fresh interpreter: this one has long imported everything.
    code = (
        "import sys, fanout; "
        "print(sorted(m for m in sys.modules if m == 'PIL' or m.startswith('PIL.') "
        "or m in ('workers.tasks', 'workers.resizing', 'orchestrator.builtin')))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert found.stdout.strip() == "[]", found.stdout


def test_every_error_fanout_defines_is_a_fanout_error_and_lives_in_one_module() -> None:
    errors = [
        value
        for value in vars(workers.errors).values()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == "workers.errors"
    ]
    assert len(errors) >= 10
    assert all(issubclass(error, workers.errors.FanoutError) for error in errors)
    # No module of the package defines an exception class of its own.
    for module_name in (
        "orchestrator.jobs",
        "orchestrator.send",
        "orchestrator.plan",
        "orchestrator.status",
        "orchestrator.canvas",
        "workers.core",
        "workers.control",
        "workers.attempts",
        "workers.callback",
    ):
        module = importlib.import_module(module_name)
        own = [
            name
            for name, value in vars(module).items()
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module_name
        ]
        assert own == [], f"{module_name} defines {own}: errors belong in workers/errors.py"


def test_the_generic_core_imports_no_built_in_job() -> None:
    code = (
        "import sys, workers.core, workers.callback, workers.control, orchestrator.canvas, "
        "orchestrator.send, orchestrator.plan; "
        "print(sorted(m for m in sys.modules if m in ('workers.tasks', 'workers.resizing', "
        "'orchestrator.builtin') or m == 'PIL'))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert found.stdout.strip() == "[]", found.stdout


def _run(code: str) -> str:
    """What ``code`` prints in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip()


def _imports(anywhere: bool) -> dict[str, set[str]]:
    """The package's modules and the package modules each imports: at its top level (not under
    ``if TYPE_CHECKING``), or with ``anywhere`` inside its functions too."""
    root = Path(__file__).resolve().parent.parent
    files = {
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
        for package in ("workers", "orchestrator", "fanout")
        for path in (root / package).rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        nodes = ast.walk(tree) if anywhere else iter(tree.body)
        found: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module:
                found.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {module for module in found if module in files and module != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every set of modules that import each other, directly or not."""
    reach = {name: set(graph[name]) for name in graph}
    changed = True
    while changed:
        changed = False
        for name in reach:
            more = set().union(*(reach[m] for m in reach[name])) - reach[name]
            if more:
                reach[name] |= more
                changed = True
    groups = {frozenset({name} | {m for m in reach[name] if name in reach[m]}) for name in graph}
    return sorted(sorted(group) for group in groups if len(group) > 1)


def test_no_two_modules_import_each_other_at_their_top_level() -> None:
    # `workers` re-exports its app for `celery -A workers`; that is the one pair allowed.
    assert _cycles(_imports(anywhere=False)) == [["workers", "workers.app"]]


def test_stopping_a_job_imports_nothing_of_the_header_task_that_reads_its_stop() -> None:
    # workers/core.py runs the header task and reads the stop through workers/control.py;
    # the purge, which needs the task's definitions, is workers/purge.py.
    graph = _imports(anywhere=True)
    assert "workers.control" in graph["workers.core"]
    assert "workers.core" not in graph["workers.control"]
    modules = {name for name in graph if name.startswith("workers.")}
    assert _cycles({name: graph[name] & modules for name in modules}) == []


def test_the_wheel_lists_every_package_of_the_source_tree() -> None:
    # setuptools builds only the packages pyproject.toml lists: a subpackage left out is missing
    # from the wheel, and so from the image (`fanout` fails there with ModuleNotFoundError).
    import tomllib

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(root).parts)
        for package in ("fanout", "workers", "orchestrator")
        for init in (root / package).rglob("__init__.py")
    }
    assert found == listed
