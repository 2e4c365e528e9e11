"""The bulk publisher checks kombu's private channel helpers and falls back to ``apply_async``.

orchestrator/publish.py frames messages with ``_lookup``, ``_inplace_augment_message``
and ``_q_for_pri`` of kombu's Redis channel.  With the kombu that pyproject.toml pins
they are there; these tests remove them, or change their shape, as another kombu
might, and show that a chord still completes, through Celery's public path, with one
warning per process.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from celery import Celery
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as kombu_virtual

from orchestrator import publish
from orchestrator.local import LocalWorker
from orchestrator.publish import CHANNEL_HELPERS, channel_mismatch
from tests.faultkit import double_job, send


class Framing:
    """A channel with the helpers in the shape the bulk path calls them."""

    def _lookup(self, exchange: str, routing_key: str, default: Any = None) -> list[str]:
        return [routing_key]

    def _inplace_augment_message(self, message: Any, exchange: str, routing_key: str) -> None: ...

    def _q_for_pri(self, queue: str, pri: int) -> str:
        return queue

    def prepare_message(
        self,
        body: Any,
        priority: Any = None,
        content_type: Any = None,
        content_encoding: Any = None,
        headers: Any = None,
        properties: Any = None,
    ) -> Any: ...

    def conn_or_acquire(self, client: Any = None) -> Any: ...


def test_a_channel_with_every_helper_in_shape_passes() -> None:
    assert channel_mismatch(Framing()) is None


@pytest.mark.system
def test_the_installed_kombu_has_the_helpers_in_the_shape_the_bulk_path_uses(app: Celery) -> None:
    # Fails when the installed kombu drifts from the one pyproject.toml pins.
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        assert isinstance(channel, kombu_redis.Channel)
        assert channel_mismatch(channel) is None


@pytest.mark.parametrize("name", sorted(CHANNEL_HELPERS))
def test_a_missing_helper_is_named(name: str) -> None:
    class Without(Framing):
        pass

    setattr(Without, name, None)
    assert channel_mismatch(Without()) == f"kombu's channel has no {name}()"


def test_a_helper_of_another_shape_is_named() -> None:
    class Reshaped(Framing):
        def _q_for_pri(self, pri: int, queue: str) -> str:  # type: ignore[override]
            return queue

    assert channel_mismatch(Reshaped()) == "kombu's _q_for_pri(pri, queue) is not _q_for_pri(queue, pri)"


# ----------------------------------------------------------------------------- system


@pytest.fixture
def fallback_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> pytest.LogCaptureFixture:
    monkeypatch.setattr(publish, "_fallback_logged", False)
    caplog.set_level(logging.WARNING, logger=publish.__name__)
    return caplog


def run_two_jobs(app: Celery) -> None:
    """Send two doubling jobs (their chords published by ``publish_chord``) and check each outcome."""
    for n in (30, 7):
        outcome = send(app, double_job(list(range(n)), 4)).wait(timeout=60)
        assert outcome["results"] == [2 * i for i in range(n)]
        assert (outcome["succeeded"], outcome["failed"]) == (n, 0)


@pytest.mark.system
def test_without_kombus_private_helpers_chords_go_through_apply_async(
    app: Celery, worker: LocalWorker, monkeypatch: pytest.MonkeyPatch, fallback_log: pytest.LogCaptureFixture
) -> None:
    # Given a kombu that renamed a helper the bulk path frames messages with
    augment = kombu_virtual.Channel._inplace_augment_message
    monkeypatch.delattr(kombu_virtual.Channel, "_inplace_augment_message")

    def basic_publish(self: Any, message: Any, exchange: str, routing_key: str, **kwargs: Any) -> Any:
        augment(self, message, exchange, routing_key)  # type: ignore[no-untyped-call]  # kombu's own path, under its new name
        if exchange:
            return self.typeof(exchange).deliver(message, exchange, routing_key, **kwargs)
        return self._put(routing_key, message, **kwargs)

    monkeypatch.setattr(kombu_virtual.Channel, "basic_publish", basic_publish)
    # When two jobs are published
    run_two_jobs(app)
    # Then both complete, and the fallback is logged once, with its reason
    warnings = [r.getMessage() for r in fallback_log.records]
    assert len(warnings) == 1
    assert "apply_async" in warnings[0] and "_inplace_augment_message" in warnings[0]


@pytest.mark.system
def test_a_helper_that_answers_in_another_shape_sends_chords_through_apply_async(
    app: Celery, worker: LocalWorker, monkeypatch: pytest.MonkeyPatch, fallback_log: pytest.LogCaptureFixture
) -> None:
    # Given a kombu whose _lookup has the same parameters but answers with something else
    monkeypatch.setattr(
        kombu_virtual.Channel, "_lookup", lambda self, exchange, routing_key, default=None: None
    )
    run_two_jobs(app)
    [warning] = [r.getMessage() for r in fallback_log.records]
    assert "_lookup() gave None" in warning


@pytest.mark.system
def test_a_chord_sent_through_apply_async_keeps_the_group_its_failure_budget_was_set_for(
    app: Celery, worker: LocalWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fanout
    from tests import userjobs

    # Given a header the bulk path does not cover (Celery's own apply_async sends it)
    monkeypatch.setattr(publish, "bulk_supported", lambda app, header: False)
    # When a job whose three odd items fail is sent with a budget of one failure
    job = fanout.submit(userjobs.odd_fails, [1, 3, 5] + [2] * 20, batch_size=1, max_failures=1)
    # Then the header went out under the group its budget was written for, and the budget stops it
    outcome = job.wait(timeout=60)
    assert str(outcome.data.get("stopped", "")).startswith("failure budget exceeded"), outcome.data
    assert outcome.failed >= 3 and outcome.total == 23
