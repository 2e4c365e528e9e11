"""docker-compose.yml and friends as ``docker compose config`` would see them, without Docker.

Compose parses the YAML, then substitutes ``${VAR}``, ``${VAR:-default}``,
``${VAR:?message}`` and ``$$`` in string values from the environment and ``.env``;
:func:`rendered` does the same with ``.env.example`` plus test secrets.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
WORKER_COMPOSE = ROOT / "docker-compose.worker.yml"
#: The HA variant, an override of COMPOSE: a master, a replica and three Sentinels.
HA_COMPOSE = ROOT / "docker-compose.ha.yml"
COMPOSE_FILES = [COMPOSE, WORKER_COMPOSE]
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"

SECRETS = {"REDIS_PASSWORD": "s3cret-redis", "FLOWER_BASIC_AUTH": "admin:s3cret-flower"}
REMOTE = {"FANOUT_REDIS_URL": "rediss://:s3cret-redis@redis.internal:6380/0?ssl_cert_reqs=CERT_REQUIRED"}
REMOTE |= {"FANOUT_DATA_DIR": "/mnt/fanout"}

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}, and $$.
_VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


class InterpolationError(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Substitute variables as Compose does, raising on a required one that is unset or empty."""

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"] or ""
        if name is None:
            return "$"
        value = env.get(name)
        missing = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":?", "?") and missing:
            raise InterpolationError(f"required variable {name} is missing a value: {arg}")
        if op in (":-", "-") and missing:
            return arg
        return value or ""

    return _VARIABLE.sub(substitute, text)


def variables_used(text: str) -> set[str]:
    return {m["name"] for m in _VARIABLE.finditer(text) if m["name"]}


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def rendered(env: dict[str, str] | None = None, path: Path = COMPOSE) -> dict[str, Any]:
    """A compose file as ``docker compose config`` would see it with .env.example plus the secrets."""
    values = read_env_file(ENV_EXAMPLE) | SECRETS | REMOTE if env is None else env

    # Like Compose: parse the YAML first, then interpolate the string values.
    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return interpolate(node, values)
        if isinstance(node, list):
            return [walk(item) for item in node]
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        return node

    doc = walk(yaml.safe_load(path.read_text()))
    assert isinstance(doc, dict)
    return doc


def service(name: str) -> dict[str, Any]:
    services = rendered()["services"]
    assert name in services, f"no service {name!r} in docker-compose.yml"
    result: dict[str, Any] = services[name]
    return result


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a Compose duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)
