# One image for every fanout service: the worker (default command), the
# orchestrator CLI (`fanout ...`) and Flower (`celery -A workers flower`).
# Pinned base; to pin further, replace the tag with its digest (python:3.11.13-slim-bookworm@sha256:...).
# Where no registry serves it, build FROM a local image with Python 3.11 and venv instead:
# docker build --build-arg PYTHON_IMAGE=... (docs/deploy.md, "No registry").
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- deps: the locked dependencies (requirements.lock, `make lock`), hash-checked, in a venv.
# Only the lock file is copied, so this layer is rebuilt only when the lock changes.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY requirements.lock /tmp/requirements.lock
RUN /opt/venv/bin/pip install --no-deps --require-hashes -r /tmp/requirements.lock

# --- build: fanout itself as a wheel (its dependencies are already in the lock)
FROM deps AS build
WORKDIR /src
# The whole context, which .dockerignore narrows to pyproject.toml, README.md, LICENSE and the
# packages pyproject.toml lists (tests/test_deploy.py keeps the two lists in step).
COPY . ./
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels .

# --- runtime: the venv, a non-root user, and nothing from the build
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# /data is where the compose file mounts the shared `data` volume; a new named
# volume copies this directory's owner, so the non-root user can write to it.
RUN groupadd --system --gid 10001 fanout \
    && useradd --system --uid 10001 --gid fanout --create-home --home-dir /home/fanout fanout \
    && mkdir -p /data /var/lib/flower \
    && chown fanout:fanout /data /var/lib/flower
# Dependencies first, fanout last: a code change rebuilds only the last two layers.
COPY --from=deps /opt/venv /opt/venv
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
USER 10001:10001
WORKDIR /home/fanout
# Exec form: celery is the process that receives SIGTERM and shuts down warmly.
CMD ["celery", "-A", "workers", "worker", "--loglevel", "INFO", "--task-events", "--concurrency", "auto"]
