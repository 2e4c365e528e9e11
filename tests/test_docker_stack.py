"""The compose stack under a real Docker engine, step by step, as a user would run it.

Builds the image from the project's Dockerfile, brings docker-compose.yml up with
three workers, runs jobs through the orchestrator service, kills and scales workers
in the middle of runs, restarts Redis under a queued job, joins a second compose
project from docker-compose.worker.yml, and takes it all down again.  Each step
is an assertion.

Runs under Debian's Compose 1.29 (``docker-compose``) against the local engine.
No image registry is reachable here, so the two base images are stand-ins built
locally (tests/standins/build.sh, cached between runs as images); the Dockerfile
and compose file take them through ``PYTHON_IMAGE`` and ``REDIS_IMAGE``.  What this
test shares with tests/test_docker_ha.py (the engine, the images, a project) is in
tests/dockerstack.py.

Marked ``docker``; without an engine, Compose or debootstrap the tests are
skipped on a laptop and fail under CI (CI=true), like the Redis tests.
``.ci/ensure-docker`` installs what is missing and starts ``dockerd`` (under CI the
fixture runs it itself).  Cold, about 6.5 minutes; cached (stand-in images and the
image's layers kept), 3 to 3.5.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from collections.abc import Iterator

import pytest

from tests.composefile import COMPOSE, WORKER_COMPOSE, read_env_file
from tests.dockerstack import (
    FLOWER_PASSWORD,
    FLOWER_USER,
    IMAGES,
    REDIS_PASSWORD,
    S3_SERVER,
    SETTINGS,
    TEST_LABEL,
    Project,
    assert_every_item_once,
    build_image,
    docker,
    prepare_engine,
    project_name,
    stack_env,
    wait_for,
    write_env,
)

pytestmark = [pytest.mark.docker, pytest.mark.system, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def timings() -> dict[str, float]:
    return {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, timings: dict[str, float]) -> Iterator[Project]:
    """docker-compose.yml's project with the stand-in base images, not yet up; torn down at the end."""
    prepare_engine(timings)
    tmp = tmp_path_factory.mktemp("stack")
    project = Project(project_name(), [COMPOSE], write_env(tmp / "env", stack_env()))
    remote = remote_of(project)
    try:
        yield project
    finally:
        docker("rm", "-f", f"{project.name}-s3", check=False)
        for each in (remote, project):
            each.down()
        print("\n".join(["", f"compose project {project.name}:", *project.log, *remote.log]))
        print("\n".join(f"{what}: {seconds:.1f} s" for what, seconds in timings.items()))


@pytest.fixture(scope="module")
def up(stack: Project, timings: dict[str, float]) -> Project:
    build_image(stack, timings)
    started = time.monotonic()
    stack("up", "-d", "--scale", "worker=3", timeout=300)
    stack.wait_healthy(expected=5)  # redis, flower, 3 workers
    timings["up, all healthy"] = time.monotonic() - started
    return stack


@pytest.fixture(scope="module")
def inputs(up: Project) -> str:
    return up.make_inputs()


# --- the steps --------------------------------------------------------------------------------


def test_three_workers_come_up_healthy_and_the_orchestrator_sees_them(up: Project) -> None:
    workers = up.workers()
    assert len(workers) == 3, workers
    # --concurrency=auto: one pool process per CPU the container may use (FANOUT_WORKER_CPUS=1).
    assert [w["concurrency"] for w in workers] == [1, 1, 1]
    names = {w["name"] for w in workers}
    ids = {up.inspect(c)["Config"]["Hostname"] for c in up.containers("worker")}
    assert names == {f"celery@{i}" for i in ids}


def test_settings_limits_and_log_rotation_reach_the_containers(up: Project) -> None:
    for service in ("worker", "flower", "orchestrator"):
        if service == "orchestrator":
            proc = up.run("env")
        else:
            proc = docker("exec", up.containers(service)[0], "env")
        env = dict(line.partition("=")[::2] for line in proc.stdout.splitlines())
        for name, value in SETTINGS.items():
            assert env[name] == value, (service, name)
        assert env["FANOUT_RESULT_EXPIRES"] == "86400" and "FANOUT_IMPORTS" in env, service
    worker = up.inspect(up.containers("worker")[0])["HostConfig"]
    assert worker["Memory"] == 2 * 1024**3 and worker["NanoCpus"] == 1_000_000_000
    assert worker["LogConfig"] == {"Type": "json-file", "Config": {"max-file": "5", "max-size": "10m"}}
    assert worker["Init"] is True
    # Redis runs as the redis user, with its append-only file on its volume.
    redis = up.containers("redis")[0]
    assert docker("exec", redis, "stat", "-c", "%U", "/proc/1").stdout.strip() == "redis"
    assert "appendonly.aof" in docker("exec", redis, "sh", "-c", "ls -R /data").stdout


@pytest.fixture(scope="module")
def demo(up: Project) -> str:
    proc = up.run("fanout", "demo", "--dir", "/data/demo", "--photos", "12", "--numbers", "500", timeout=300)
    return proc.stdout + proc.stderr


def test_the_demo_leaves_outputs_manifest_and_contact_sheet_in_the_data_volume(
    up: Project, demo: str
) -> None:
    listing = up.run("sh", "-c", "cd /data/demo/resized && ls").stdout.split()
    assert "manifest.json" in listing and "contact-sheet.jpg" in listing
    assert len([f for f in listing if f.startswith("photo-")]) == 12
    manifest = json.loads(up.run("cat", "/data/demo/resized/manifest.json").stdout)
    assert (manifest["images"], manifest["succeeded"], manifest["failed"]) == (12, 12, 0)
    sheet = up.run(
        "python",
        "-c",
        "from PIL import Image; print(Image.open('/data/demo/resized/contact-sheet.jpg').size)",
    )
    assert sheet.stdout.strip().startswith("(")


def test_flower_refuses_anonymous_calls_and_lists_the_runs_tasks(up: Project, demo: str) -> None:
    port = read_env_file(up.env_file)["FLOWER_PORT"]
    url = f"http://127.0.0.1:{port}/api/tasks?limit=10000"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    refused.value.close()
    jobs = {line.rsplit("job ", 1)[1].strip() for line in demo.splitlines() if ", job " in line}
    assert len(jobs) == 2, demo
    login = b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {login}"})

    def listed() -> bool:
        with urllib.request.urlopen(request, timeout=10) as response:
            tasks = json.load(response)
        collects = {
            tid for tid, t in tasks.items() if t["name"] == "fanout.collect" and t["state"] == "SUCCESS"
        }
        headers = {t["name"] for t in tasks.values()}
        return jobs <= collects and {"fanout.resize_items", "fanout.double_batch"} <= headers

    wait_for(listed, 30, "Flower to list both demo runs' tasks")


def test_a_worker_killed_mid_resize_loses_nothing(up: Project, inputs: str) -> None:
    out = "/data/out-kill"
    run = up.resize_in_background(out)
    wait_for(lambda: up.outputs(out) >= 10 or run.poll() is not None, 120, "the resize to start")
    assert run.poll() is None and up.outputs(out) < IMAGES, "the run ended before the kill"
    victim = up.containers("worker")[0]
    docker("kill", victim)
    assert_every_item_once(run, out)


def test_scaling_down_to_one_worker_mid_run_loses_nothing(up: Project, inputs: str) -> None:
    up("up", "-d", "--scale", "worker=3")
    wait_for(lambda: len(up.workers()) == 3, 120, "three workers again")
    out = "/data/out-scale"
    run = up.resize_in_background(out)
    wait_for(lambda: up.outputs(out) >= 10 or run.poll() is not None, 120, "the resize to start")
    assert run.poll() is None, "the run ended before the scale-down"
    up("up", "-d", "--scale", "worker=1", timeout=300)
    assert len(up.containers("worker")) == 1
    assert_every_item_once(run, out)


def test_a_queued_job_survives_a_redis_restart(up: Project, inputs: str) -> None:
    # Given a job sent with --no-wait, its messages waiting in Redis with no worker running
    sent = up.run("fanout", "resize", "/data/in", "--out", "/data/out-aof", "--max-side", "256",
                  "--no-contact-sheet", "--no-wait", "--json")  # fmt: skip
    job_id = json.loads(sent.stdout)["job_id"]
    up("stop", "-t", "60", "worker")
    status = json.loads(up.run("fanout", "status", job_id, "--json").stdout)
    assert status["state"] == "running" and status["items_pending"] > 0, status
    # When Redis restarts (its append-only file is all that keeps the queue)
    [redis] = up.containers("redis")
    restarted_at = docker("inspect", "-f", "{{.State.StartedAt}}", redis).stdout.strip()
    up("restart", "redis")
    wait_for(lambda: up.health().get(f"{up.name}_redis_1") == "healthy", 60, "Redis healthy again")
    started_again = docker("inspect", "-f", "{{.State.StartedAt}}", redis).stdout.strip()
    assert started_again != restarted_at
    # It came back from the append-only file (not from a snapshot taken at shutdown).
    since = docker("logs", "--since", started_again, redis).stdout
    assert "DB loaded from append only file" in since, since[-2000:]
    up("start", "worker")
    # Then the job completes
    done = up.run(
        "fanout", "status", job_id, "--wait", "--json", "--timeout", "240", timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads(done.stdout)
    assert (document["total"], document["succeeded"], document["failed"]) == (IMAGES, IMAGES, 0)


def remote_of(up: Project) -> Project:
    """The worker-only project (docker-compose.worker.yml) that joins ``up``'s Redis."""
    here = up.env_file.parent
    return Project(f"{up.name}w", [WORKER_COMPOSE, here / "join.yml"], here / "remote.env")


def start_s3_server(up: Project) -> str:
    """moto's S3 server on the central compose network as ``s3:5000``; its container's name."""
    name = f"{up.name}-s3"
    network = f"{up.name}_default"
    docker("run", "-d", "--name", name, "--network", network, "--network-alias", "s3",
           "--label", f"{TEST_LABEL}={up.name}", S3_SERVER)  # fmt: skip
    wait_for(lambda: "Running on" in docker("logs", name).stderr, 60, "the S3 server")
    return name


def test_a_worker_only_project_joins_the_stacks_redis_and_takes_work(up: Project) -> None:
    remote = remote_of(up)
    # As another machine would: the central Redis's URL, no shared directory, s3 credentials.
    (up.env_file.parent / "join.yml").write_text(
        "services:\n  worker:\n    networks: [central]\n"
        f"networks:\n  central:\n    external: true\n    name: {up.name}_default\n"
    )
    start_s3_server(up)
    aws = {"AWS_ACCESS_KEY_ID": "remote-key", "AWS_SECRET_ACCESS_KEY": "remote-secret"}
    aws |= {"AWS_ENDPOINT_URL": "http://s3:5000"}
    values = read_env_file(up.env_file) | aws | {"FANOUT_DATA_DIR": ""}
    values["FANOUT_REDIS_URL"] = f"redis://:{REDIS_PASSWORD}@redis:6379/0"
    write_env(remote.env_file, values)
    up("up", "-d", "--scale", "worker=0")
    remote("up", "-d", "--scale", "worker=1")
    remote.wait_healthy(expected=1)
    [container] = remote.containers("worker")
    env = dict(line.partition("=")[::2] for line in docker("exec", container, "env").stdout.splitlines())
    assert {k: env[k] for k in aws} == aws and env["FANOUT_TASK_TIME_LIMIT"] == "10"
    # No shared directory: /data is a volume of the worker project's own.
    mounts = remote.inspect(container)["Mounts"]
    assert [(m["Type"], m["Destination"]) for m in mounts] == [("volume", "/data")]
    assert mounts[0]["Name"] == f"{remote.name}_data"
    # The central orchestrator sees only the remote worker, and it does the work.
    [worker] = up.workers()
    assert worker["name"] == f"celery@{remote.inspect(container)['Config']['Hostname']}"
    doubled = json.loads(up.run("fanout", "double", "--json", *map(str, range(50))).stdout)
    assert doubled["results"] == [2 * i for i in range(50)] and doubled["failed"] == 0
    # A resize by s3:// URL, which the remote worker can only do through the object store.
    with_aws = [a for k, v in (aws | {"AWS_DEFAULT_REGION": "us-east-1"}).items() for a in ("-e", f"{k}={v}")]
    upload = (
        "import s3fs; fs = s3fs.S3FileSystem(); fs.mkdir('photos'); fs.mkdir('thumbs'); "
        "[fs.put(f'/data/in/img-{i:03d}.jpg', f'photos/in/img-{i:03d}.jpg') for i in range(10)]"
    )
    up("run", "--rm", "-T", *with_aws, "orchestrator", "python", "-c", upload)
    command = ["fanout", "resize", "s3://photos/in", "--out", "s3://thumbs/out", "--max-side", "64", "--json"]
    resize = up("run", "--rm", "-T", *with_aws, "orchestrator", *command, check=False)
    assert resize.returncode == 0, resize.stderr[-2000:]
    document = json.loads(resize.stdout)
    assert (document["total"], document["succeeded"], document["failed"]) == (10, 10, 0)
    assert [r["destination"] for r in document["results"]] == [
        f"s3://thumbs/out/img-{i:03d}.jpg" for i in range(10)
    ]
    listed = up("run", "--rm", "-T", *with_aws, "orchestrator", "python", "-c",
                "import s3fs; print(sorted(s3fs.S3FileSystem().ls('thumbs/out')))").stdout  # fmt: skip
    assert "thumbs/out/manifest.json" in listed and "thumbs/out/img-009.jpg" in listed


def test_the_metrics_profile_has_prometheus_scrape_the_exporter(up: Project) -> None:
    up("--profile", "metrics", "up", "-d", "exporter", "prometheus", timeout=300)
    try:
        assert up.run("fanout", "double", "1", "2", "3").stdout.split() == ["2", "4", "6"]
        env = read_env_file(up.env_file)

        def value(expr: str) -> float | None:
            query = urllib.parse.urlencode({"query": expr})
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{env['PROMETHEUS_PORT']}/api/v1/query?{query}", timeout=5
                ) as r:
                    result = json.load(r)["data"]["result"]
            except OSError:
                return None
            return float(result[0]["value"][1]) if result else None

        # The stack's workers, and the items of the runs so far, as Prometheus scraped them.
        wait_for(
            lambda: (value("sum(fanout_active_worker_count)") or 0) >= 1, 120, "Prometheus to see the workers"
        )
        doubled = 'sum(fanout_items_succeeded_total{name="fanout.double_batch"})'
        wait_for(lambda: (value(doubled) or 0) >= 3, 60, "Prometheus to count the doubled items")
        assert (value('sum(fanout_jobs{state="done"})') or 0) >= 1
    finally:  # gone even if a wait failed: the next tests expect the stack without them
        up("--profile", "metrics", "rm", "-f", "-s", "exporter", "prometheus")


def test_down_v_leaves_nothing_running(up: Project) -> None:
    remote = remote_of(up)
    docker("rm", "-f", f"{up.name}-s3", check=False)  # the test's S3 server, not the stack's
    remote("down", "-v", "-t", "30")
    up("down", "-v", "-t", "30")
    for project in (up.name, remote.name):
        label = f"label=com.docker.compose.project={project}"
        assert docker("ps", "-aq", "--filter", label).stdout.split() == []
        assert docker("volume", "ls", "-q", "--filter", label).stdout.split() == []
        assert docker("network", "ls", "-q", "--filter", label).stdout.split() == []
