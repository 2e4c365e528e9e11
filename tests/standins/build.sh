#!/usr/bin/env bash
# Build the stand-ins for the two base images the stack names, for machines that reach no image
# registry (tests/test_docker_stack.py runs this): a Debian bookworm root filesystem from
# debootstrap, then on top of it
#   $PYTHON_STANDIN  Debian's python3 + venv + a `python` link (for python:3.11-slim-bookworm),
#                    trusting this host's CA bundle so pip works behind a re-signing proxy;
#   $REDIS_STANDIN   Debian's redis-server with a docker-entrypoint.sh that drops root like
#                    the official image's (for redis:7-alpine);
#   $S3_SERVER       moto's S3-compatible server, for the s3:// round trip of remote workers;
#   $PROMETHEUS_STANDIN  Debian's prometheus, its binary the entrypoint (for prom/prometheus).
# An image that already exists is kept: delete it (docker rmi) to rebuild.  Test-only: the
# host's CA bundle goes into the Python stand-in, never into the image fanout ships.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
docker=${DOCKER:-/usr/bin/docker}
DEBIAN_STANDIN=${DEBIAN_STANDIN:-fanout-standin/debian:bookworm}
PYTHON_STANDIN=${PYTHON_STANDIN:-fanout-standin/python:3.11-bookworm}
REDIS_STANDIN=${REDIS_STANDIN:-fanout-standin/redis:7-bookworm}
S3_SERVER=${S3_SERVER:-fanout-standin/moto:5.2.5}
PROMETHEUS_STANDIN=${PROMETHEUS_STANDIN:-fanout-standin/prometheus:2-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-$(python3 -m pip config get global.cert 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)}

exists() { "$docker" image inspect "$1" >/dev/null 2>&1; }

if ! exists "$DEBIAN_STANDIN"; then
    root=$(mktemp -d /var/tmp/fanout-debootstrap.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    echo "standins: debootstrap bookworm into $root" >&2
    debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$root.log" 2>&1 \
        || { tail -20 "$root.log" >&2; exit 1; }
    rm -f "$root.log"
    # As the official image: no apt caches, no docs; apt sources pointing at the mirror used here.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | "$docker" import - "$DEBIAN_STANDIN" >/dev/null
    rm -rf "$root"
    trap - EXIT
fi

if ! exists "$PYTHON_STANDIN"; then
    context=$(mktemp -d)
    cp "$CA_BUNDLE" "$context/host-ca.pem"
    cat >"$context/Dockerfile" <<DOCKERFILE
FROM $DEBIAN_STANDIN
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && ln -s /usr/bin/python3 /usr/local/bin/python && rm -rf /var/lib/apt/lists/*
# Test-only: this host's CA bundle, so pip inside a build trusts the registry's re-signed TLS.
COPY host-ca.pem /etc/ssl/certs/host-ca.pem
ENV PIP_CERT=/etc/ssl/certs/host-ca.pem SSL_CERT_FILE=/etc/ssl/certs/host-ca.pem
CMD ["python3"]
DOCKERFILE
    echo "standins: building $PYTHON_STANDIN" >&2
    "$docker" build -q -t "$PYTHON_STANDIN" "$context" >/dev/null
    rm -rf "$context"
fi

if ! exists "$REDIS_STANDIN"; then
    context=$(mktemp -d)
    cp "$here/redis-entrypoint.sh" "$context/docker-entrypoint.sh"
    cat >"$context/Dockerfile" <<DOCKERFILE
FROM $DEBIAN_STANDIN
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* && mkdir /data && chown redis:redis /data
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME /data
WORKDIR /data
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server", "--protected-mode", "no"]
DOCKERFILE
    echo "standins: building $REDIS_STANDIN" >&2
    "$docker" build -q -t "$REDIS_STANDIN" "$context" >/dev/null
    rm -rf "$context"
fi

if ! exists "$S3_SERVER"; then
    context=$(mktemp -d)
    cat >"$context/Dockerfile" <<DOCKERFILE
FROM $PYTHON_STANDIN
RUN python -m venv /opt/moto && /opt/moto/bin/pip install --no-cache-dir 'moto[server]==${S3_SERVER##*:}'
EXPOSE 5000
CMD ["/opt/moto/bin/moto_server", "-H", "0.0.0.0", "-p", "5000"]
DOCKERFILE
    echo "standins: building $S3_SERVER" >&2
    "$docker" build -q -t "$S3_SERVER" "$context" >/dev/null
    rm -rf "$context"
fi

if ! exists "$PROMETHEUS_STANDIN"; then
    context=$(mktemp -d)
    cat >"$context/Dockerfile" <<DOCKERFILE
FROM $DEBIAN_STANDIN
# policy-rc.d: the package's postinst must not try to start a service in the build.
RUN printf '#!/bin/sh\\nexit 101\\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \\
    && apt-get update && apt-get install -y --no-install-recommends prometheus \\
    && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \\
    && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
USER prometheus
VOLUME /prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
DOCKERFILE
    echo "standins: building $PROMETHEUS_STANDIN" >&2
    "$docker" build -q -t "$PROMETHEUS_STANDIN" "$context" >/dev/null
    rm -rf "$context"
fi
