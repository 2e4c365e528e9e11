"""Unit tests of the Redis URL forms (plain, TLS, Sentinel), and what Celery, kombu and fanout build of them.

No Redis here: tests/test_tls.py and tests/test_sentinel.py run the same URLs against real servers.
"""

from __future__ import annotations

import ssl

import pytest
from celery import Celery

from workers import connections
from workers.app import celery_config
from workers.errors import ConfigError
from workers.settings import Settings, Tls, cert_reqs, parse_sentinel_url

CA = "/certs/ca.pem"


# --- TLS: ssl_cert_reqs as Celery's docs spell it, and as redis-py does ---------------------


@pytest.mark.parametrize(
    ("given", "spelled"),
    [
        ("CERT_REQUIRED", "required"),
        ("required", "required"),
        ("cert_required", "required"),
        ("CERT_OPTIONAL", "optional"),
        ("optional", "optional"),
        ("CERT_NONE", "none"),
        ("none", "none"),
    ],
)
def test_ssl_cert_reqs_is_taken_in_both_spellings_and_given_to_redis_py_in_its_own(
    given: str, spelled: str
) -> None:
    url = f"rediss://:pw@redis.internal:6380/0?ssl_cert_reqs={given}&ssl_ca_certs={CA}"
    settings = Settings.from_env({"FANOUT_REDIS_URL": url})
    expected = f"rediss://:pw@redis.internal:6380/0?ssl_cert_reqs={spelled}&ssl_ca_certs={CA}"
    assert settings.broker_url == settings.result_backend == expected


def test_the_documented_tls_url_builds_a_redis_py_client_that_verifies_against_its_ca() -> None:
    """The URL of docs/deploy.md: redis-py itself refuses CERT_REQUIRED; fanout's own client takes it."""
    url = f"rediss://:pw@redis.internal:6380/0?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={CA}"
    settings = Settings.from_env({"FANOUT_REDIS_URL": url})
    client = connections.client(settings.broker_url, settings)
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["ssl_ca_certs"] == CA
        connection = client.connection_pool.make_connection()
        assert connection.cert_reqs == ssl.CERT_REQUIRED  # type: ignore[attr-defined]
    finally:
        connections.close(client)


def test_a_tls_url_without_ssl_cert_reqs_verifies_the_server() -> None:
    settings = Settings.from_env({"FANOUT_REDIS_URL": "rediss://redis.internal:6380/0"})
    assert settings.broker_url == "rediss://redis.internal:6380/0?ssl_cert_reqs=required"


def test_the_tls_url_is_one_that_celerys_backend_and_kombu_accept() -> None:
    url = f"rediss://:pw@redis.internal:6380/0?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={CA}"
    app = Celery("t", set_as_current=False)
    app.conf.update(celery_config(Settings.from_env({"FANOUT_REDIS_URL": url})))
    assert app.backend.connparams["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert app.backend.connparams["ssl_ca_certs"] == CA
    with app.connection_for_write() as connection:
        assert connection.transport_options.get("master_name") is None
        assert connection.hostname == "redis.internal"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("rediss://r:6380/0?ssl_cert_reqs=CERT_MAYBE", "not one of CERT_REQUIRED"),
        (f"redis://r:6379/0?ssl_ca_certs={CA}", "need a rediss:// URL"),
    ],
)
def test_bad_tls_options_are_refused_by_name(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({"FANOUT_REDIS_URL": url})


def test_cert_reqs_names_the_setting_it_refuses() -> None:
    with pytest.raises(ConfigError, match="FANOUT_SENTINEL_TLS_CERT_REQS"):
        cert_reqs("FANOUT_SENTINEL_TLS_CERT_REQS", "yes")


# --- Sentinel URLs ------------------------------------------------------------------------


def test_a_sentinel_url_is_accepted_with_the_database_on_every_sentinel() -> None:
    """kombu reads the database from the first Sentinel, users write it on the last one."""
    settings = Settings.from_env({"FANOUT_REDIS_URL": "sentinel://h1:26379;sentinel://h2:26380/3"})
    assert settings.broker_url == "sentinel://h1:26379/3;sentinel://h2:26380/3"
    assert settings.result_backend == settings.broker_url
    assert settings.sentinel_master == "mymaster"
    assert settings.uses_sentinel


def test_a_sentinel_urls_password_is_the_masters_and_goes_on_every_sentinel() -> None:
    parsed = parse_sentinel_url("X", "sentinel://:s%40cret@h1:26379;sentinel://h2;sentinel://[::1]:26381/2")
    assert parsed.hosts == (("h1", 26379), ("h2", 26379), ("::1", 26381))
    assert (parsed.db, parsed.password, parsed.username) == (2, "s@cret", None)
    assert parsed.url() == (
        "sentinel://:s%40cret@h1:26379/2;sentinel://:s%40cret@h2:26379/2;sentinel://:s%40cret@[::1]:26381/2"
    )
    assert parse_sentinel_url("X", parsed.url()) == parsed


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sentinel://h1:26379;redis://h2:6379/0", "is not a Sentinel"),
        ("sentinel://h1:26379/1;sentinel://h2:26379/2", "different databases"),
        ("sentinel://:a@h1;sentinel://:b@h2", "different passwords"),
        ("sentinel://h1:notaport", "not a valid URL"),
        ("sentinel://:26379", "names no host"),
        ("sentinel://h1:26379/zero", "must be a number"),
        ("sentinel://h1:26379/0?ssl_cert_reqs=required", "takes no options"),
        ("sentinel://;", "names no host"),
        ("sentinel://:secret@h1:notaport", "not a valid URL"),
    ],
)
def test_bad_sentinel_urls_are_refused_by_name(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        Settings.from_env({"FANOUT_REDIS_URL": url})
    assert "FANOUT_REDIS_URL" in str(caught.value)
    for password in (":a@", ":b@", "secret"):
        assert password not in str(caught.value)  # no password in the message


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FANOUT_SENTINEL_TLS": "1"}, "no Redis URL is a sentinel:// one"),
        ({"FANOUT_SENTINEL_PASSWORD": "pw"}, "no Redis URL is a sentinel:// one"),
        (
            {"FANOUT_REDIS_URL": "sentinel://h1", "FANOUT_SENTINEL_TLS_CA_CERTS": CA},
            "without FANOUT_SENTINEL_TLS=1",
        ),
        ({"FANOUT_REDIS_URL": "sentinel://h1", "FANOUT_SENTINEL_TLS": "maybe"}, "expected 1 or 0"),
        (
            {
                "FANOUT_REDIS_URL": "sentinel://h1",
                "FANOUT_SENTINEL_TLS": "1",
                "FANOUT_SENTINEL_TLS_CERTFILE": "c",
            },
            "go together",
        ),
        ({"FANOUT_REDIS_URL": "sentinel://h1", "FANOUT_SENTINEL_MASTER": "my master"}, "no spaces"),
    ],
)
def test_bad_sentinel_settings_are_refused_by_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def sentinel_settings() -> Settings:
    return Settings.from_env(
        {
            "FANOUT_REDIS_URL": "sentinel://:redispw@h1:26379;sentinel://h2:26380/4",
            "FANOUT_SENTINEL_MASTER": "fanout-master",
            "FANOUT_SENTINEL_PASSWORD": "sentinelpw",
            "FANOUT_SENTINEL_TLS": "1",
            "FANOUT_SENTINEL_TLS_CA_CERTS": CA,
            "FANOUT_SENTINEL_TLS_CERT_REQS": "CERT_REQUIRED",
        }
    )


def test_sentinel_settings_reach_kombus_transport_and_celerys_sentinel_backend() -> None:
    settings = sentinel_settings()
    assert settings.sentinel_tls == Tls(cert_reqs="required", ca_certs=CA)
    conf = celery_config(settings)
    assert conf["result_backend"].startswith("workers.backend:RetryingSentinelBackend+sentinel://")
    for options in (conf["broker_transport_options"], conf["result_backend_transport_options"]):
        assert options["master_name"] == "fanout-master"
        assert options["sentinel_kwargs"]["password"] == "sentinelpw"
        assert options["sentinel_kwargs"]["ssl"] is True
        assert options["sentinel_kwargs"]["ssl_ca_certs"] == CA
        assert options["sentinel_kwargs"]["socket_timeout"] == settings.connect_timeout
    assert (
        conf["broker_use_ssl"]
        == conf["redis_backend_use_ssl"]
        == {"ssl_cert_reqs": "required", "ssl_ca_certs": CA}
    )

    app = Celery("t", set_as_current=False)
    app.conf.update(conf)
    from workers.backend import RetryingChordMixin, RetryingSentinelBackend

    backend = app.backend
    assert isinstance(backend, RetryingSentinelBackend) and isinstance(backend, RetryingChordMixin)
    assert [(h["host"], h["port"]) for h in backend.connparams["hosts"]] == [("h1", 26379), ("h2", 26380)]
    assert (backend.connparams["db"], backend.connparams["password"]) == (4, "redispw")
    assert backend.connparams["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert backend.connparams["retry"].get_retries() >= 20  # rides out a failover, not 3 quick tries
    assert backend.connparams["connection_class"] is connections.FollowingSSLConnection
    with app.connection_for_write() as connection:
        assert connection.transport.driver_type == "redis"
        assert connection.transport_options["master_name"] == "fanout-master"
        assert connection.alt == settings.broker_url.split(";")


def test_fanouts_own_client_asks_the_sentinels_with_their_password_and_tls() -> None:
    settings = sentinel_settings()
    client = connections.client(settings.result_backend, settings)
    try:
        pool = client.connection_pool
        assert pool.service_name == "fanout-master"  # type: ignore[attr-defined]
        assert pool.connection_kwargs["password"] == "redispw"
        assert pool.connection_kwargs["db"] == 4
        assert pool.connection_kwargs["ssl_ca_certs"] == CA
        sentinels = pool.sentinel_manager.sentinels  # type: ignore[attr-defined]
        assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380]
        first = sentinels[0].connection_pool.connection_kwargs
        assert first["password"] == "sentinelpw" and first["ssl_ca_certs"] == CA
    finally:
        connections.close(client)


def test_plain_settings_add_nothing_for_sentinel() -> None:
    conf = celery_config(Settings.from_env({}))
    assert "master_name" not in conf["broker_transport_options"]
    assert "broker_use_ssl" not in conf and "redis_backend_use_ssl" not in conf
    assert conf["result_backend"].startswith("workers.backend:RetryingRedisBackend+redis://")


def test_empty_sentinel_settings_as_compose_passes_them_mean_the_defaults() -> None:
    names = ["MASTER", "PASSWORD", "TLS", "TLS_CA_CERTS", "TLS_CERT_REQS", "TLS_CERTFILE", "TLS_KEYFILE"]
    settings = Settings.from_env({f"FANOUT_SENTINEL_{name}": "" for name in names})
    assert (settings.sentinel_master, settings.sentinel_password, settings.sentinel_tls) == (
        "mymaster",
        None,
        None,
    )
