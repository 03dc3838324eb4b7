r"""A TCP proxy in front of a real S3 server, for fault tests that must strike at a precise request.

The proxy passes bytes both ways unchanged. A `Rule` matches a request by a regular expression on
what the client sends (the request line and headers arrive in one piece:
r"PUT /bucket/key\?\S*partNumber=2", "If-None-Match: \*"), lets `skip` such requests pass, and
then, once:
- `before()` runs before the request is passed on (kill the server: the request meets an outage);
- `after_answer()` runs once the server's answer has been relayed (the request succeeded, then the
  outage begins);
- `drop_answer` cuts the connection instead of relaying the answer: "final" loses the final answer
  but relays an interim "100 Continue" (the write lands whole, its client never hears), "first"
  cuts at the first byte back (with `Expect: 100-continue` the body never arrives).

What fails is always the real server or a real connection; the proxy only picks the moment.
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass
class Rule:
    pattern: bytes
    before: Optional[Callable[[], None]] = None
    after_answer: Optional[Callable[[], None]] = None
    drop_answer: Optional[str] = None  # None, "final" or "first"
    skip: int = 0  # matching requests to let through first
    fired: threading.Event = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.fired = threading.Event()


class S3Proxy:
    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.rules: list[Rule] = []
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def on(self, pattern: bytes | str, **kwargs) -> Rule:
        """Add a rule; `pattern` is a regular expression."""
        rule = Rule(pattern.encode() if isinstance(pattern, str) else pattern, **kwargs)
        with self._lock:
            self.rules.append(rule)
        return rule

    def _match(self, data: bytes) -> Optional[Rule]:
        with self._lock:
            for rule in self.rules:
                if not rule.fired.is_set() and re.search(rule.pattern, data):
                    if rule.skip > 0:
                        rule.skip -= 1
                        continue
                    rule.fired.set()
                    return rule
        return None

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()  # the server is down: the client sees its connection closed
            return
        pending: list[Rule] = []  # rules waiting for this connection's next answer
        threading.Thread(target=self._answers, args=(upstream, client, pending), daemon=True).start()
        try:
            while data := client.recv(65536):
                rule = self._match(data)
                if rule is not None:
                    if rule.before is not None:
                        rule.before()
                    if rule.after_answer is not None or rule.drop_answer:
                        pending.append(rule)
                upstream.sendall(data)
        except OSError:
            pass
        _close(client, upstream)

    def _answers(self, upstream: socket.socket, client: socket.socket, pending: list[Rule]) -> None:
        try:
            while data := upstream.recv(65536):
                rule = pending[0] if pending else None
                if rule is not None and rule.drop_answer:
                    interim = data.startswith(b"HTTP/1.1 100")
                    if rule.drop_answer == "first" or not interim:
                        pending.pop(0)
                        break
                client.sendall(data)
                if rule is not None and not rule.drop_answer and not data.startswith(b"HTTP/1.1 100"):
                    pending.pop(0)
                    rule.after_answer()
        except OSError:
            pass
        _close(client, upstream)

    def close(self) -> None:
        self.sock.close()


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
