# One image for every fanout service: the worker (default command), the
# orchestrator CLI (`fanout ...`) and Flower (`celery -A workers flower`).
# Pinned base; to pin further, replace the tag with its digest (python:3.11.13-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- build: install fanout and its dependencies (from pyproject.toml) into a venv
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY workers ./workers
COPY orchestrator ./orchestrator
# A regular (not editable) install: the runtime stage needs only /opt/venv.
# The s3 extra lets workers read and write s3:// URLs (docs/object-storage.md).
RUN /opt/venv/bin/pip install ".[s3]"

# --- runtime: the venv, a non-root user, and nothing from the build
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# /data is where the compose file mounts the shared `data` volume; a new named
# volume copies this directory's owner, so the non-root user can write to it.
RUN groupadd --system --gid 10001 fanout \
    && useradd --system --uid 10001 --gid fanout --create-home --home-dir /home/fanout fanout \
    && mkdir -p /data /var/lib/flower \
    && chown fanout:fanout /data /var/lib/flower
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/fanout
# Exec form: celery is the process that receives SIGTERM and shuts down warmly.
CMD ["celery", "-A", "workers", "worker", "--loglevel", "INFO", "--task-events"]
