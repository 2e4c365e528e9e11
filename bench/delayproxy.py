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

Threads, not asyncio: the event loop's timers wake on whole milliseconds (epoll),
so a 1 ms delay came out at 1-2 ms; ``time.sleep`` until each chunk's due time is
good to about 0.1 ms.  Used by ``python -m bench.latency``; loopback only.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
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

    Each connection has a reader and a writer thread per direction.  :meth:`close`
    (or leaving the ``with``) closes the listener and every socket, and joins the threads.
    """

    def __init__(self, target: tuple[str, int], delay: float = 0.0) -> None:
        self.target = target
        self.delay = delay
        self.port = 0
        self._traffic = Traffic()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    def start(self) -> DelayProxy:
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept)
        return self

    def take(self) -> Traffic:
        """The traffic counted since the last call; the counts start again from zero."""
        with self._lock:
            taken, self._traffic = self._traffic, Traffic()
        return taken

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in list(self._threads):
            thread.join(5)
        for sock in sockets:
            sock.close()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name="delay-proxy", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closing.is_set():
                    client.close()
                    server.close()
                    return
                self._sockets.update((client, server))
                self._traffic.connections += 1
            last = ["down"]  # the direction of the last chunk on this connection
            ends = [2]  # pumps still running: the second to finish closes both sockets
            for args in ((client, server, "up", RespCommands()), (server, client, "down", None)):
                chunks: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()
                self._spawn(self._read, args[0], chunks, args[2], last, args[3])
                self._spawn(self._write, args[1], chunks, (client, server), ends)

    def _read(
        self,
        sock: socket.socket,
        chunks: queue.SimpleQueue[tuple[float, bytes] | None],
        direction: str,
        last: list[str],
        parser: RespCommands | None,
    ) -> None:
        """Read ``sock``; queue each chunk with its due time (never ahead of an earlier one)."""
        due = 0.0
        try:
            while data := sock.recv(_READ):
                names = parser.feed(data) if parser is not None else []
                now = time.monotonic()
                with self._lock:
                    traffic = self._traffic
                    if direction == "up":
                        traffic.bytes_up += len(data)
                        traffic.round_trips += last[0] == "down"
                        traffic.commands.update(names)
                    else:
                        traffic.bytes_down += len(data)
                    last[0] = direction
                due = max(due, now + self.delay)
                chunks.put((due, data))
        except OSError:
            pass
        finally:
            chunks.put(None)

    def _write(
        self,
        sock: socket.socket,
        chunks: queue.SimpleQueue[tuple[float, bytes] | None],
        pair: tuple[socket.socket, socket.socket],
        ends: list[int],
    ) -> None:
        """Send each chunk to ``sock`` at its due time; pass the end of the stream on."""
        try:
            while (item := chunks.get()) is not None:
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            for other in pair:  # one side is gone: end the other direction too
                with contextlib.suppress(OSError):
                    other.shutdown(socket.SHUT_RDWR)
            while chunks.get() is not None:
                pass
        finally:
            with self._lock:
                ends[0] -= 1
                done = ends[0] == 0
                if done:
                    self._sockets.difference_update(pair)
            if done:
                for other in pair:
                    other.close()
