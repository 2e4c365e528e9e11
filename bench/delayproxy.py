"""A TCP proxy that delays each direction, and counts the Redis commands and round trips through it.

The kernel here has no netem, so a worker "on another machine" is a worker whose
Redis URL points at this proxy.  Every chunk read from one side is written to the
other ``delay`` seconds after it arrived (in order), so a request and its reply
cross a link of ``2 x delay`` round-trip time.  ``delay`` can be changed while
connections are open: the same proxy at 0 passes bytes straight through, so
comparing the two leaves the proxy's own cost out.

It also reads the client's side as RESP: :meth:`DelayProxy.take` gives the
commands by name (``PUBLISH`` by channel kind, ``EVALSHA`` by script) and the
round trips, turnarounds: a client chunk that follows a
reply on the same connection (a pipeline of 500 commands is one).  Those are the
waits a link's latency adds to.

One thread runs an event loop on ``select`` (its timeout is in microseconds; epoll's,
asyncio's default, is in whole milliseconds, which made a 1 ms delay 1-2 ms), with
protocols and timers rather than streams and tasks: the proxy's CPU is taken from
the worker's 2 cores.  On this machine a request and its reply cost it about 70 us of
CPU (a thread per direction: 160 us).  Either side's end (EOF or error) closes both.
Used by ``python -m bench.latency``; loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import selectors
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from types import TracebackType

_READ = 1 << 16


@dataclass
class Traffic:
    """What crossed the proxy since the last :meth:`DelayProxy.take`."""

    commands: Counter[str] = field(default_factory=Counter)
    round_trips: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    connections: int = 0


class RespCommands:
    """Splits a client's byte stream into RESP commands and names each one."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[str]:
        self.buffer += data
        names: list[str] = []
        pos = 0
        while (parsed := self._one(pos)) is not None:
            name, pos = parsed
            names.append(name)
        del self.buffer[:pos]
        return names

    def _one(self, pos: int) -> tuple[str, int] | None:
        buf = self.buffer
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        if buf[pos : pos + 1] != b"*":  # an inline command
            return bytes(buf[pos:end]).split(b" ", 1)[0].upper().decode(errors="replace"), end + 2
        parts: list[bytes] = []
        count, pos = int(buf[pos + 1 : end]), end + 2
        for _ in range(count):
            end = buf.find(b"\r\n", pos)
            if end < 0:
                return None
            start = end + 2
            stop = start + int(buf[pos + 1 : end])
            if stop + 2 > len(buf):
                return None
            if len(parts) < 3:
                parts.append(bytes(buf[start:stop]))
            pos = stop + 2
        return _name(parts), pos


def _name(parts: list[bytes]) -> str:
    """The command's name, with what tells its purpose: a PUBLISH's channel kind, an EVALSHA's script."""
    name = parts[0].upper().decode(errors="replace") if parts else "?"
    if name == "PUBLISH" and len(parts) > 1:
        channel = parts[1].decode(errors="replace")
        # kombu's fanout channels are "/{db}.{exchange}/{routing key}": celeryev/task.started...
        if channel.startswith("celery-task-meta-"):
            return "PUBLISH celery-task-meta"  # a result, to a client subscribed to it
        kind = channel.split(".", 1)[-1].split("/", 1)
        return f"PUBLISH {kind[0]}" + (f" {kind[1].split('.')[0]}" if len(kind) > 1 else "")
    if name in ("EVAL", "EVALSHA") and len(parts) > 1:
        script = parts[1]
        sha = hashlib.sha1(script).hexdigest() if name == "EVAL" else script.decode(errors="replace")
        return f"{name} {sha[:8]}"
    if name in ("CLIENT", "CONFIG", "SCRIPT") and len(parts) > 1:
        return f"{name} {parts[1].upper().decode(errors='replace')}"
    return name


class DelayProxy:
    """Listens on 127.0.0.1 (an ephemeral port) and forwards to ``target``, ``delay`` s late each way.

    Runs its own event loop in a thread; :meth:`close` (or leaving the ``with``)
    closes the listener and every connection, and joins the thread.
    """

    def __init__(self, target: tuple[str, int], delay: float = 0.0) -> None:
        self.target = target
        self.delay = delay
        self.port = 0
        self._traffic = Traffic()
        self._lock = threading.Lock()
        self._loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()

    def start(self) -> DelayProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def take(self) -> Traffic:
        """The traffic counted since the last call; the counts start again from zero."""
        with self._lock:
            taken, self._traffic = self._traffic, Traffic()
        return taken

    def close(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(15)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def _listen(self) -> asyncio.Server:
        return await self._loop.create_server(lambda: _Client(self), "127.0.0.1", 0)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for transport in list(self._transports):
            transport.close()
        await asyncio.sleep(0)  # let connection_lost run
        if self._server is not None:
            await self._server.wait_closed()

    def _count(self, direction: str, data: bytes, names: list[str], turnaround: bool) -> None:
        with self._lock:
            traffic = self._traffic
            if direction == "up":
                traffic.bytes_up += len(data)
                traffic.round_trips += turnaround
                traffic.commands.update(names)
            else:
                traffic.bytes_down += len(data)


class _Delayed:
    """One direction of a connection: chunks written ``delay`` after they arrived, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport) -> None:
        self.loop = loop
        self.transport = transport
        self.chunks: deque[tuple[float, bytes | None]] = deque()
        self.due = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def push(self, data: bytes | None, delay: float) -> None:
        """Queue ``data`` (None: the end of the stream) to go out ``delay`` from now."""
        self.due = max(self.due, self.loop.time() + delay)  # never ahead of an earlier chunk
        self.chunks.append((self.due, data))
        if self.timer is None:
            self.timer = self.loop.call_at(self.due, self.flush)

    def flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.chunks and self.chunks[0][0] <= now:
            _, data = self.chunks.popleft()
            if self.transport.is_closing():
                self.chunks.clear()
                return
            if data is None:  # the other side ended: end this one, once what it sent is written
                self.transport.close()
                self.chunks.clear()
                return
            else:
                self.transport.write(data)
        if self.chunks:
            self.timer = self.loop.call_at(self.chunks[0][0], self.flush)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.chunks.clear()


class _Side(asyncio.Protocol):
    """One socket of a proxied connection; what it reads goes to ``out``, delayed."""

    def __init__(
        self, proxy: DelayProxy, direction: str, last: list[str], parser: RespCommands | None
    ) -> None:
        self.proxy = proxy
        self.direction = direction
        self.last = last  # the direction of the last chunk on this connection, shared by both sides
        self.parser = parser
        self.transport: asyncio.Transport | None = None
        self.out: _Delayed | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.proxy._transports.add(transport)

    def data_received(self, data: bytes) -> None:
        names = self.parser.feed(data) if self.parser is not None else []
        self.proxy._count(self.direction, data, names, self.last[0] == "down")
        self.last[0] = self.direction
        if self.out is not None:
            self.out.push(data, self.proxy.delay)

    def eof_received(self) -> bool:
        return False  # this side closes; connection_lost ends the other

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.proxy._transports.discard(self.transport)
        if self.out is not None:
            if exc is None:
                self.out.push(None, self.proxy.delay)  # after what this side sent before its end
            else:
                self.out.cancel()
                self.out.transport.close()


class _Client(_Side):
    """The worker's side: on connecting, open the connection to Redis and link the two."""

    def __init__(self, proxy: DelayProxy) -> None:
        super().__init__(proxy, "up", ["down"], RespCommands())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        try:
            _, server = await loop.create_connection(
                lambda: _Side(self.proxy, "down", self.last, None), *self.proxy.target
            )
        except OSError:
            self.transport.close()
            return
        assert server.transport is not None
        with self.proxy._lock:
            self.proxy._traffic.connections += 1
        self.out, server.out = _Delayed(loop, server.transport), _Delayed(loop, self.transport)
        if self.transport.is_closing():  # the worker left while Redis was being reached
            server.transport.close()
            return
        self.transport.resume_reading()
