"""A TCP proxy on 127.0.0.1 that injects network faults in front of a real server.

Plain threads (one acceptor, two pumps per connection): blocking sockets make "reset now" and
"hold this connection silently" easy to reason about, and tests open few connections.
Faults are switched at runtime and apply to connections that are already open too, because
boto3 keeps connections alive in a pool and a fault that only hit new ones would be dodged.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass

_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST instead of FIN


@dataclass(frozen=True)
class _Mode:  # a new object per switch, so per-connection byte counts restart at each switch
    kind: str = "pass"  # pass | reset_after_bytes | blackhole | refuse_conditional
    limit: int = 0
    delay: float = 0.0


class FaultProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._mode = _Mode()
        self._reset_budget = self._lost_replies = 0
        self._socks: set[socket.socket] = set()
        self._closed = False
        self.connections_seen = 0
        self.resets_done = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # switches -------------------------------------------------------------------------------
    def pass_through(self) -> None:
        with self._lock:
            self._mode, self._reset_budget, self._lost_replies = _Mode(), 0, 0

    def reset_next(self, n: int = 1) -> None:
        """RST the next ``n`` connections: new ones on accept, open ones on their next data."""
        with self._lock:
            self._reset_budget = n

    def reset_after_bytes(self, n: int) -> None:
        """Forward ``n`` bytes upstream per connection, then RST it (a reset mid-upload)."""
        with self._lock:
            self._mode = _Mode("reset_after_bytes", limit=n)

    def lose_next_replies(self, n: int = 1) -> None:
        """Let the next ``n`` requests reach the server, then RST instead of their reply (a write that landed, unacknowledged)."""
        with self._lock:
            self._lost_replies = n

    def latency(self, seconds: float) -> None:
        """Delay every chunk, both directions, by ``seconds``."""
        with self._lock:
            self._mode = _Mode("pass", delay=seconds)

    def refuse_conditional_writes(self) -> None:
        """Answer ``501 NotImplemented`` to every request with If-None-Match / If-Match, as some stores do.

        The proxy then reads requests (head, then Content-Length bytes of body) instead of bytes,
        on connections already open too; switch it while the connections are idle.
        """
        with self._lock:
            self._mode = _Mode("refuse_conditional")

    def blackhole(self) -> None:
        """Accept, never forward, never answer: the peer only ever sees a timeout."""
        with self._lock:
            self._mode = _Mode("blackhole")

    # machinery ------------------------------------------------------------------------------
    def _take_reset(self) -> bool:
        with self._lock:
            if self._reset_budget <= 0:
                return False
            self._reset_budget -= 1
            self.resets_done += 1
            return True

    def _take_lost_reply(self) -> bool:
        with self._lock:
            if self._lost_replies <= 0:
                return False
            self._lost_replies -= 1
            self.resets_done += 1
            return True

    def _track(self, sock: socket.socket) -> bool:
        with self._lock:
            if not self._closed:
                self._socks.add(sock)
            return not self._closed

    def _drop(self, *socks: socket.socket | None) -> None:
        for s in socks:
            if s is None:
                continue
            with self._lock:
                self._socks.discard(s)
            try:
                s.shutdown(socket.SHUT_RDWR)  # close() alone would not wake a pump blocked in recv
            except OSError:
                pass
            s.close()

    def _reset(self, client: socket.socket, upstream: socket.socket | None = None) -> None:
        # Only called where no thread is blocked reading ``client``, so a plain close sends the
        # RST at once; shutdown() first would send a FIN ahead of it.
        with self._lock:
            self._socks.discard(client)
        try:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
        except OSError:
            pass
        client.close()
        self._drop(upstream)

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            with self._lock:
                self.connections_seen += 1
            if not self._track(client) or self._take_reset():
                self._reset(client)
                continue
            threading.Thread(target=self._open, args=(client,), daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        upstream = None
        with self._lock:
            blackholed = self._mode.kind == "blackhole"
        if not blackholed:
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                self._reset(client)  # server down: fail fast, like a refused connection
                return
            if not self._track(upstream):
                self._drop(client, upstream)
                return
            threading.Thread(target=self._pump, args=(upstream, client, client, upstream, False),
                             daemon=True).start()
        self._pump(client, upstream, client, upstream, True)

    def _pump(self, src, dst, client, upstream, is_upload: bool) -> None:
        mode, sent = None, 0
        try:
            while True:
                data = src.recv(65536)
                if not data:  # HTTP peers do not half-close: one side done means both are
                    self._drop(client, upstream)
                    return
                with self._lock:
                    if self._mode is not mode:
                        mode, sent = self._mode, 0
                # an interim "100 Continue" is not the reply: the body is still to be sent after it
                if not is_upload and not data.startswith(b"HTTP/1.1 100 ") and self._take_lost_reply():
                    self._reset(client, upstream)  # the server has done the request; its answer never arrives
                    return
                if is_upload and self._take_reset():
                    self._reset(client, upstream)
                    return
                if is_upload and mode.kind == "refuse_conditional" and dst is not None:
                    self._requests(data, client, upstream)
                    return
                if mode.kind == "blackhole" or dst is None:
                    continue  # swallow it
                if mode.delay:
                    time.sleep(mode.delay)
                if is_upload and mode.kind == "reset_after_bytes" and sent + len(data) >= mode.limit:
                    dst.sendall(data[: mode.limit - sent])
                    with self._lock:
                        self.resets_done += 1
                    self._reset(client, upstream)
                    return
                dst.sendall(data)
                sent += len(data)
        except OSError:
            self._drop(client, upstream)

    def _requests(self, buf: bytes, client, upstream) -> None:
        """Forward HTTP requests one by one; a conditional one gets a 501 and the connection is closed."""
        while True:
            while b"\r\n\r\n" not in buf:
                data = client.recv(65536)
                if not data:
                    self._drop(client, upstream)
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            fields = {k.strip().lower(): v.strip() for k, _, v in
                      (line.decode("latin-1").partition(":") for line in head.split(b"\r\n")[1:])}
            left = int(fields.get("content-length") or 0)
            if "if-none-match" in fields or "if-match" in fields:
                if fields.get("expect", "").lower() != "100-continue":  # the body is on its way: read it first
                    while len(buf) < left:
                        data = client.recv(65536)
                        if not data:
                            break
                        buf += data
                body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code>'
                        b"<Message>A header you provided implies functionality that is not implemented</Message></Error>")
                client.sendall(b"HTTP/1.1 501 Not Implemented\r\nContent-Type: application/xml\r\n"
                               b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                self._drop(client, upstream)
                return
            upstream.sendall(head + b"\r\n\r\n")
            while left:  # with Expect: 100-continue the body comes once the server said so
                if not buf:
                    buf = client.recv(65536)
                    if not buf:
                        self._drop(client, upstream)
                        return
                chunk, buf = buf[:left], buf[left:]
                upstream.sendall(chunk)
                left -= len(chunk)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks, self._socks = list(self._socks), set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._drop(*socks)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
