"""`check` asks the DNS for the published DKIM key: a real DNS server on loopback answers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from appeal_mailer.dkim import Signer, load_key
from tests.conftest import CliRun, ConfigWriter

NAME = "appeal2026._domainkey.example.org."


class DnsServer:
    """A UDP DNS server on 127.0.0.1, port 0: TXT records by name; SERVFAIL when `failing`."""

    def __init__(self) -> None:
        self.records: dict[str, list[list[bytes]]] = {}
        self.failing = False
        self.asked: list[str] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> DnsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self._sock.recvfrom(4096)
            except OSError:
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
                    " ".join('"' + part.decode() + '"' for part in strings)
                    for strings in self.records[name]
                ]
                response.answer.append(dns.rrset.from_text_list(name, 300, "IN", "TXT", texts))
            self._sock.sendto(response.to_wire(), peer)


@pytest.fixture
def dns_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[DnsServer]:
    """The DNS server every lookup of this test goes to (dnspython's default resolver)."""
    server = DnsServer().start()
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port
    monkeypatch.setattr(dns.resolver, "default_resolver", resolver)
    yield server
    server.stop()


def _key_file(path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two RSA-2048 keys: the one configured, and another."""
    folder = tmp_path_factory.mktemp("dkim-keys")
    return _key_file(folder / "dkim.pem"), _key_file(folder / "other.pem")


@pytest.fixture
def dkim_config(write_config: ConfigWriter, config_file: Path, keys: tuple[Path, Path]) -> Path:
    """config.toml with [dkim] (written over `config_file`, which run_cli also asks for)."""
    return write_config(
        dkim={"domain": "example.org", "selector": "appeal2026", "private_key_file": str(keys[0])}
    )


def _record(key: Path) -> str:
    signer = Signer(load_key(key.read_bytes(), key, None), "example.org", "appeal2026")
    return signer.dns_record()[1]


def _strings(record: str) -> list[bytes]:
    # As `check` prints it, and as DNS zone files hold it: strings of at most 255.
    return [record[i : i + 255].encode() for i in range(0, len(record), 255)]


def test_check_confirms_the_published_key_split_into_255_character_strings(
    dns_server: DnsServer, dkim_config: Path, run_cli: CliRun, keys: tuple[Path, Path]
) -> None:
    """A record published as `check` printed it (several TXT strings) is this key: ok."""
    dns_server.records[NAME] = [_strings(_record(keys[0]))]
    result = run_cli("check", "--no-smtp", config=dkim_config)
    assert result.exit_code == 0, result.output
    assert "dkim: appeal2026._domainkey.example.org publishes this key" in result.output
    assert dns_server.asked == [NAME]
    # What `check` says to publish is what the server holds, string for string.
    printed = " ".join(f'"{s.decode()}"' for s in _strings(_record(keys[0])))
    assert f"{NAME} IN TXT {printed}" in result.output


def test_check_fails_when_the_dns_publishes_another_key(
    dns_server: DnsServer, dkim_config: Path, run_cli: CliRun, keys: tuple[Path, Path]
) -> None:
    """Another key at the selector: every signature would fail, so `check` stops with exit 1."""
    dns_server.records[NAME] = [_strings(_record(keys[1]))]
    result = run_cli("check", "--no-smtp", config=dkim_config)
    assert result.exit_code == 1
    assert "the DNS publishes another key at appeal2026._domainkey.example.org" in result.output
    assert "[dkim] selector" in result.output
    assert "all checks passed" not in result.output


def test_check_fails_when_the_published_key_is_revoked(
    dns_server: DnsServer, dkim_config: Path, run_cli: CliRun
) -> None:
    """An empty p= is a revoked key (RFC 6376 3.6.1): `check` says so and fails."""
    dns_server.records[NAME] = [[b"v=DKIM1; k=rsa; p="]]
    result = run_cli("check", "--no-smtp", config=dkim_config)
    assert result.exit_code == 1
    assert "the DNS publishes a revoked key" in result.output


def test_check_warns_when_nothing_is_published_yet(
    dns_server: DnsServer, dkim_config: Path, run_cli: CliRun
) -> None:
    """No record yet (NXDOMAIN): a warning, not a failure; the record to publish is printed."""
    result = run_cli("check", "--no-smtp", config=dkim_config)
    assert result.exit_code == 0, result.output
    assert "dkim: warning: nothing is published at appeal2026._domainkey.example.org" in (
        result.output
    )
    assert "IN TXT" in result.output
    assert dns_server.asked == [NAME]


def test_check_says_so_when_the_dns_cannot_be_asked(
    dns_server: DnsServer, dkim_config: Path, run_cli: CliRun
) -> None:
    """A DNS server that fails (SERVFAIL): `check` says it could not look, and how to look."""
    dns_server.failing = True
    result = run_cli("check", "--no-smtp", config=dkim_config)
    assert result.exit_code == 0, result.output
    assert "dkim: could not ask the DNS for appeal2026._domainkey.example.org" in result.output
    assert "dig TXT appeal2026._domainkey.example.org" in result.output


def test_check_finds_the_key_among_other_txt_records(
    dns_server: DnsServer, dkim_config: Path, run_cli: CliRun, keys: tuple[Path, Path]
) -> None:
    """Other TXT records at the name, and spaces inside p= (allowed), do not hide the key."""
    key = _record(keys[0]).split("p=")[1]
    spaced = " ".join(key[i : i + 64] for i in range(0, len(key), 64))
    record = f"v=DKIM1; k=rsa; p={spaced}".encode()
    dns_server.records[NAME] = [[b"google-site-verification=abc"], [record[:255], record[255:]]]
    result = run_cli("check", "--no-smtp", config=dkim_config)
    assert result.exit_code == 0, result.output
    assert "publishes this key" in result.output
