"""How a Device reaches the Edge: the ``Transport`` interface and its in-process implementation.

The in-process transport runs the edge on its own worker thread and delivers every frame after the
delay its emulated link gives it (latency, jitter, bandwidth, loss with retransmission), sleeping in
real time, so a device that keeps drafting while a block is in flight really overlaps with the
edge. Every frame is counted from its serialized bytes, per direction and message type.

The links' delivery threads share the interpreter lock with the device: ``responsive_links`` keeps a busy device
from delaying them (use it around a harness that drafts during waits).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from covspec.protocol import Link, TrafficCounter, decode, encode
from covspec.protocol.link import sleep_until
from covspec.protocol.messages import DOWN_MESSAGES, Message

EdgeHandler = Callable[[bytes], Iterator[tuple[Message, bytes]]]

LINK_SWITCH_INTERVAL_S = 5e-4
"""Python's thread switch interval while emulated links run (the interpreter's default is 5 ms). A link delivers
frames on threads of the device's process; while the device drafts branches during a wait, a delivery thread that
wakes up waits for the interpreter lock up to the switch interval, a delay no real network adds and one that only
busy devices pay (drafting_bench at 50 ms, one run each: adaptive + branching 1.22x fixed gamma with 5 ms, 1.37x
with 0.5 ms). 0.5 ms keeps it below one draft step."""


@contextlib.contextmanager
def responsive_links(interval_s: float = LINK_SWITCH_INTERVAL_S) -> Iterator[None]:
    """Lower the thread switch interval to ``interval_s`` for the block, or for each call of a function it decorates
    (``LINK_SWITCH_INTERVAL_S``), then restore it. Process-wide: for harnesses that own their process (benches)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


class Transport(Protocol):
    """The device's view of the link to the edge. One transport per device."""

    traffic: TrafficCounter

    def send(self, msg: Message) -> None:
        """Serialize ``msg``, count its bytes and put it on the uplink; returns at once."""
        ...

    def recv(self, timeout: float | None = None) -> Message:
        """The next frame from the edge, decoded and validated. Raises ``TimeoutError``; ``timeout=0`` polls."""
        ...

    def close(self) -> None: ...


class _DelayLine:
    """Delivers items to a queue at given monotonic times, in order, on one thread."""

    def __init__(self, deliver: Callable[[bytes], None], name: str) -> None:
        self._deliver = deliver
        self._heap: list[tuple[float, int, bytes]] = []
        self._cv = threading.Condition()
        self._count = itertools.count()
        self._closed = False
        self._last_arrival = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, payload: bytes, delay_s: float) -> None:
        with self._cv:
            # TCP-like: a frame never overtakes an earlier one in the same direction.
            arrival = max(time.perf_counter() + delay_s, self._last_arrival)
            self._last_arrival = arrival
            heapq.heappush(self._heap, (arrival, next(self._count), payload))
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed and not self._heap:
                    return
                arrival, _, payload = self._heap[0]
                if arrival - time.perf_counter() > 0.002:
                    self._cv.wait(timeout=arrival - time.perf_counter() - 0.001)
                    continue
                heapq.heappop(self._heap)
            sleep_until(arrival)
            self._deliver(payload)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=5)


class LinkEnds:
    """What a transport over an emulated link needs on the device's side: both delay lines, byte counting per
    frame, and the device's inbox. ``deliver_up`` takes a frame off the uplink once its delay has passed."""

    def __init__(self, link: Link, traffic: TrafficCounter | None, deliver_up: Callable[[bytes], None]) -> None:
        self.link = link
        self.traffic = traffic or TrafficCounter()
        self._device_inbox: queue.Queue[bytes] = queue.Queue()
        self._up = _DelayLine(deliver_up, "link-up")
        self._down = _DelayLine(self._device_inbox.put, "link-down")

    def send(self, msg: Message) -> None:
        payload = encode(msg)
        self.traffic.record("up", msg, len(payload))
        self._up.put(payload, self.link.transfer_time("up", len(payload)))

    def send_raw(self, payload: bytes) -> None:
        """Put arbitrary bytes on the uplink (for tests of the edge's handling of bad frames)."""
        self._up.put(payload, self.link.transfer_time("up", len(payload)))

    def recv(self, timeout: float | None = None) -> Message:
        try:
            payload = self._device_inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no reply from the edge within {timeout} s") from None
        return decode(payload, expected=DOWN_MESSAGES)

    def _reply(self, msg_type: str | type | object, payload: bytes) -> None:
        """Count a reply frame and put it on the downlink."""
        self.traffic.record("down", msg_type, len(payload))
        self._down.put(payload, self.link.transfer_time("down", len(payload)))


class InProcessTransport(LinkEnds):
    """A device's link to an edge in the same process, the edge computing on its own thread.

    Args:
        handler: the edge's frame handler (``Edge.handle``), yielding (message, frame) replies.
        link: the emulated link of this device.
        traffic: where to count bytes (a new counter by default).
        idle: called when the edge has answered a frame and none is waiting (``Edge.prefill_idle``).
    """

    def __init__(self, handler: EdgeHandler, link: Link, traffic: TrafficCounter | None = None,
                 idle: Callable[[], object] | None = None) -> None:  # fmt: skip
        self._handler = handler
        self._idle = idle
        self._edge_inbox: queue.Queue[bytes | None] = queue.Queue()
        super().__init__(link, traffic, self._edge_inbox.put)
        self._worker = threading.Thread(target=self._serve, name="edge-worker", daemon=True)
        self._worker.start()

    def _serve(self) -> None:
        while (payload := self._edge_inbox.get()) is not None:
            for msg, reply in self._handler(payload):
                self._reply(msg, reply)
            if self._idle is not None and self._edge_inbox.empty():  # nothing queued: the edge's idle work
                self._idle()

    def close(self) -> None:
        self._up.close()
        self._edge_inbox.put(None)
        self._worker.join(timeout=30)
        self._down.close()
