"""A DNS server on loopback for the tests: TXT records a test publishes, NXDOMAIN otherwise.

`check` asks the DNS for the DKIM key it signs with, and dkimpy's own lookup
(through dnspython) asks it too; the `loopback_dns` fixture points dnspython's
default resolver here, so neither ever reaches the network.
"""

from __future__ import annotations

import socket
import threading

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class LoopbackDns:
    """A UDP DNS server on 127.0.0.1, port 0; answers SERVFAIL while `failing` is set."""

    def __init__(self) -> None:
        # Each name's TXT records, each record its character-strings in order.
        self.records: dict[str, list[list[str]]] = {}
        self.asked: list[str] = []
        self.failing = False
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._closing = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def publish(self, name: str, strings: list[str]) -> None:
        """One more TXT record at `name`: its character-strings, in order."""
        self.records.setdefault(name.lower().rstrip(".") + ".", []).append(strings)

    def _serve(self) -> None:
        while True:
            data, peer = self._sock.recvfrom(4096)
            if self._closing:
                return
            query = dns.message.from_wire(data)
            question = query.question[0]
            name = question.name.to_text().lower()
            self.asked.append(name)
            response = dns.message.make_response(query)
            if self.failing:
                response.set_rcode(dns.rcode.SERVFAIL)
            elif name not in self.records:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.TXT:
                texts = [
                    " ".join(f'"{string}"' for string in strings) for strings in self.records[name]
                ]
                response.answer.append(dns.rrset.from_text_list(name, 300, "IN", "TXT", texts))
            self._sock.sendto(response.to_wire(), peer)

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving: a datagram of its own wakes the thread, which then ends."""
        self._closing = True
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
            waker.sendto(b"", ("127.0.0.1", self.port))
        self._thread.join(timeout=timeout)
        self._sock.close()
