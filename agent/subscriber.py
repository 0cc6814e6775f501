"""The ZeroMQ boundary: the only module that imports zmq.

Owns: a SUB socket on oned's hook-manager publisher, its subscriptions, and
knowing when it (re)connected — PUB/SUB drops whatever was published while
we were away, so every (re)connect must be followed by a reconcile. Polls
with a timeout so the caller's loop keeps ticking. Must not: interpret
messages (events.py does) or decide anything.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message


@dataclass
class Batch:
    messages: list[tuple[bytes, bytes]] = field(default_factory=list)
    connected: bool = False      # a (re)connect happened: reconcile everything
    disconnected: bool = False


class Subscriber:
    def __init__(self, endpoint: str, topics: Iterable[str],
                 context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.endpoint = endpoint
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 200)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        self._sock.setsockopt(zmq.LINGER, 0)
        for t in topics:
            self._sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._sock.connect(endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def poll(self, timeout: float, limit: int = 1000) -> Batch:
        """Wait up to `timeout` seconds; return what arrived (at most `limit`)."""
        batch = Batch()
        ready = dict(self._poller.poll(int(timeout * 1000)))
        if self._monitor in ready:
            while self._monitor.poll(0):
                event = recv_monitor_message(self._monitor)["event"]
                if event == zmq.EVENT_CONNECTED:
                    batch.connected = True
                elif event == zmq.EVENT_DISCONNECTED:
                    batch.disconnected = True
        if self._sock in ready:
            while len(batch.messages) < limit:
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) >= 2:
                    batch.messages.append((frames[0], frames[1]))
                else:
                    batch.messages.append((frames[0], b""))
        return batch

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(0)
        self._sock.close(0)


def probe(endpoint: str, timeout: float) -> bool:
    """Whether a ZeroMQ peer at `endpoint` completes a ZMTP handshake with a
    SUB socket within `timeout` seconds (`oneback doctor`): a closed port, or
    a port where something else listens, does not."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(endpoint)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if monitor.poll(max(1, int(left * 1000))):
                if recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    return True
        return False
    except zmq.ZMQError:
        return False
    finally:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        monitor.close(0)
        sock.close(0)
