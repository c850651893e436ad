"""A device's link to the Ray Serve edge: frames go through a deployment handle after their emulated delay.

Same contract as the in-process transport (``covspec.runtime.transport``): ``send`` serializes, counts and puts a
frame on the emulated uplink; when it "arrives", a caller thread hands it to the edge deployment
(``handle.options(stream=True).frames.remote(peer, frame)``) and every reply frame is counted and put on the
emulated downlink. Calls are made in order, one at a time (a device has one request in flight), so replies keep
their order. A call that fails (the edge replica died, the deployment is being replaced) becomes an
``ErrorReply`` with code ``unavailable`` for the frame's session: the device reopens the session from its
committed tokens (``covspec.runtime.device.EdgeSession``). Such transport-made replies are not counted as traffic.

``peer`` is the device's identity towards the edge (like a TLS client identity): sessions are bound to it, and the
``session_id`` routing option keeps all of a device's calls on one replica (affinity, when the deployment uses the
consistent-hash router).
"""

from __future__ import annotations

import queue
import threading

from covspec.protocol import Link, TrafficCounter, decode, encode
from covspec.protocol.messages import DOWN_MESSAGES, UP_MESSAGES, ErrorCode, ErrorReply, Message
from covspec.runtime.transport import _DelayLine


class ServeTransport:
    """A device's link to the edge deployment behind ``handle``.

    Args:
        handle: a Ray Serve ``DeploymentHandle`` of the edge (``covspec.cluster.edge_app``).
        link: the emulated link of this device.
        peer: this device's identity at the edge.
        call_timeout_s: a call with no complete answer after this long counts as failed.
    """

    def __init__(self, handle, link: Link, peer: str, call_timeout_s: float = 120.0) -> None:
        self.link = link
        self.peer = peer
        self.traffic = TrafficCounter()
        self.call_timeout_s = call_timeout_s
        self._handle = handle.options(stream=True, session_id=peer)
        self._calls: queue.Queue[bytes | None] = queue.Queue()
        self._inbox: queue.Queue[bytes] = queue.Queue()
        self._up = _DelayLine(self._calls.put, "link-up")
        self._down = _DelayLine(self._inbox.put, "link-down")
        self._caller = threading.Thread(target=self._call_loop, name="edge-caller", daemon=True)
        self._caller.start()

    def send(self, msg: Message) -> None:
        payload = encode(msg)
        self.traffic.record("up", msg, len(payload))
        self._up.put(payload, self.link.transfer_time("up", len(payload)))

    def recv(self, timeout: float | None = None) -> Message:
        try:
            payload = self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no reply from the edge within {timeout} s") from None
        return decode(payload, expected=DOWN_MESSAGES)

    def _call_loop(self) -> None:
        while (payload := self._calls.get()) is not None:
            try:
                for frame in self._handle.frames.remote(self.peer, payload):
                    msg = decode(frame, expected=DOWN_MESSAGES)
                    self.traffic.record("down", msg, len(frame))
                    self._down.put(frame, self.link.transfer_time("down", len(frame)))
            except Exception as exc:
                self._down.put(encode(self._unavailable(payload, exc)), self.link.transfer_time("down", 0))

    @staticmethod
    def _unavailable(payload: bytes, exc: Exception) -> ErrorReply:
        try:
            msg = decode(payload, expected=UP_MESSAGES)
            sid, seq = msg.session_id, getattr(msg, "seq", -1)
        except Exception:
            sid, seq = "", -1
        text = f"edge call failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return ErrorReply(sid, seq, ErrorCode.UNAVAILABLE, text[:4096])

    def close(self) -> None:
        self._up.close()
        self._calls.put(None)
        self._caller.join(timeout=30)
        self._down.close()
