"""The edge in a process of its own, reached over pipes through emulated links.

``InProcessTransport`` runs the edge on a thread of the device's process. That is exact but not parallel: with
models this small both sides are mostly Python, so the device's drafting and the edge's verification take turns
on one interpreter lock, and a device that keeps drafting while its block is verified (parallel branching) slows
the verification it is waiting for. ``EdgeProcess`` loads the target in a spawned process (its own interpreter,
``threads`` torch threads) and serves each device link on its own thread there; ``PipeTransport`` is the device's
end: frames cross the emulated link (latency, jitter, bandwidth, loss) exactly as in-process, then a pipe.

Only serialized frames cross the pipes (``send_bytes`` / ``recv_bytes``; nothing is unpickled from them), and
the edge validates every frame as it does behind Ray Serve.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
from multiprocessing.connection import Connection

from covspec.models.loading import resolve_path
from covspec.protocol import Link, TrafficCounter, decode
from covspec.protocol.messages import DOWN_MESSAGES
from covspec.runtime.transport import LinkEnds

START_TIMEOUT_S = 300.0


def _serve_link(edge, conn: Connection, peer: str) -> None:
    """Answer one device link's frames until the device closes it (closing this end tells its reader)."""
    with conn:
        while True:
            try:
                payload = conn.recv_bytes()
            except (EOFError, OSError):
                return
            if not payload:  # the device end's goodbye (no frame is empty)
                return
            for _msg, reply in edge.handle(payload, peer):
                try:
                    conn.send_bytes(reply)
                except OSError:
                    return
            if not conn.poll(0):  # nothing waiting on this link: prefill sessions still waiting for a block
                edge.prefill_idle()


def _edge_main(target: tuple[str, str, str], threads: int, session_ttl_s: float, conns: list[Connection],
               ready: Connection, prefill: str = "idle") -> None:  # fmt: skip
    """The child: load the target, report ready (or the error), serve every link until its pipe closes."""
    try:
        import torch

        from covspec.models.loading import load_adapter
        from covspec.runtime.edge import Edge

        torch.set_num_threads(threads)
        path, dtype, device = target
        edge = Edge(load_adapter(path, dtype, device, key="models.target.path"), session_ttl_s=session_ttl_s,
                    prefill=prefill)  # fmt: skip
    except Exception as exc:  # reported to the parent, which raises it with the message
        ready.send_bytes(f"error: {exc}".encode())
        return
    ready.send_bytes(b"ready")
    workers = [threading.Thread(target=_serve_link, args=(edge, conn, f"link-{i}"), name=f"edge-link-{i}")
               for i, conn in enumerate(conns)]  # fmt: skip
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def _say_goodbye(conn: Connection) -> None:
    with contextlib.suppress(OSError):  # the edge process may be gone already
        conn.send_bytes(b"")


class EdgeProcess:
    """An edge verifier for the target at ``path`` in a spawned process with ``links`` device links.

    ``transport(link)`` hands out one link's device end at a time (at most ``links``). ``close()`` closes every
    pipe, which ends the edge's serving threads, and waits for the process. Usable as a context manager.
    """

    def __init__(self, path: str, links: int, dtype: str = "float32", device: str = "cpu", threads: int = 1,
                 session_ttl_s: float = 600.0, start_timeout_s: float = START_TIMEOUT_S,
                 prefill: str = "idle") -> None:  # fmt: skip
        if links < 1:
            raise ValueError(f"links must be >= 1, got {links}")
        path = resolve_path(path, key="models.target.path")  # a missing checkpoint fails here, before the spawn
        ctx = mp.get_context("spawn")
        pairs = [ctx.Pipe(duplex=True) for _ in range(links)]
        ready_recv, ready_send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_edge_main,
            args=(
                (path, dtype, device),
                threads,
                session_ttl_s,
                [child for _, child in pairs],
                ready_send,
                prefill,
            ),
            name="covspec-edge",
            daemon=True,
        )
        self._proc.start()
        for _, child in pairs:
            child.close()
        ready_send.close()
        self._free = [parent for parent, _ in pairs]
        self._transports: list[PipeTransport] = []
        try:
            if not ready_recv.poll(start_timeout_s):
                raise RuntimeError(f"the edge process did not start within {start_timeout_s:g} s")
            status = ready_recv.recv_bytes().decode()
        except EOFError:
            status = f"error: the edge process exited (code {self._proc.exitcode}) before it was ready"
        except Exception:
            self.close()
            raise
        finally:
            ready_recv.close()
        if status != "ready":
            self.close()
            raise RuntimeError(f"edge process: {status.removeprefix('error: ')}")

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def transport(self, link: Link, traffic: TrafficCounter | None = None) -> PipeTransport:
        """The device end of the next free link."""
        if not self._free:
            raise RuntimeError("every link of this edge process is taken")
        transport = PipeTransport(self._free.pop(0), link, traffic)
        self._transports.append(transport)
        return transport

    def close(self, timeout_s: float = 30.0) -> None:
        for transport in self._transports:
            transport.close()
        for conn in self._free:
            _say_goodbye(conn)
            conn.close()
        self._free = []
        self._proc.join(timeout_s)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)

    def __enter__(self) -> EdgeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PipeTransport(LinkEnds):
    """A device's link to an ``EdgeProcess``: the emulated link's delays, then a pipe; bytes counted per frame."""

    def __init__(self, conn: Connection, link: Link, traffic: TrafficCounter | None = None) -> None:
        self._conn = conn
        self._closed = False
        super().__init__(link, traffic, self._to_edge)
        self._reader = threading.Thread(target=self._read, name="link-reader", daemon=True)
        self._reader.start()

    def _to_edge(self, payload: bytes) -> None:
        if not self._closed:
            self._conn.send_bytes(payload)

    def _read(self) -> None:
        while True:
            try:
                payload = self._conn.recv_bytes()
            except (EOFError, OSError):
                return
            try:
                msg_type: object = decode(payload, expected=DOWN_MESSAGES)
            except Exception:
                msg_type = "undecodable"  # recv() raises the decode error
            self._reply(msg_type, payload)

    def close(self) -> None:
        if self._closed:
            return
        self._up.close()  # delivers what is still on the uplink
        self._closed = True
        # Closing a socket does not wake a thread blocked reading it: the edge's end closes on the goodbye, which
        # ends this side's reader with EOF; then the pipe can be closed.
        _say_goodbye(self._conn)
        self._reader.join(timeout=5)
        self._conn.close()
        self._down.close()
