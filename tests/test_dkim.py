"""DKIM signing (dkim.py, signing.py), each signature checked by dkimpy, a verifier of its own.

What is signed is built by mime.py's MessageBuilder, or sent by the real CLI to
the recording SMTP server (or written by a dry run); dkimpy gets the public key
the way a receiver's DNS would give it: a TXT record built here from the public
key, from Signer.dns_record(), or as `appeal-mailer check` prints it. The keys
are real, made once per session with `cryptography` and written as PEM files.
"""

# The names and subjects use Cyrillic and Kazakh letters on purpose:
# ruff: noqa: RUF001

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import hashlib
import itertools
import json
import multiprocessing
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed
from dkim.util import parse_tag_value
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from appeal_mailer import signing
from appeal_mailer.config import CampaignSettings, DkimSettings, load_settings
from appeal_mailer.dkim import Signer, _relaxed_body, _relaxed_field
from appeal_mailer.errors import AppealMailerError, ConfigError
from appeal_mailer.ledger import Ledger
from appeal_mailer.mime import MessageBuilder
from appeal_mailer.models import Recipient, RenderedMessage
from appeal_mailer.signing import SigningProcess
from tests.conftest import CliRun, ConfigWriter, ListWriter
from tests.dnsd import LoopbackDns
from tests.smtpd import Received, RecordingServer
from tests.test_cli import _run_in_terminal

DOMAIN = "example.org"
SELECTOR = "appeal2026"
DNS_NAME = f"{SELECTOR}._domainkey.{DOMAIN}"
ADDRESS = "member@example.org"
SUBJECT = "Free the Karaganda three"
TEXT = "Please forward this appeal.\n"
KAZAKH_NAME = "Ерлан Қасымұлы Әбдіқадыров"
RUSSIAN_SUBJECT = "Срочно: три профсоюзных лидера в Караганде арестованы"
UNSUBSCRIBE_URL = "https://lists.example.org/unsubscribe?e={email}&t={token}"
UNSUBSCRIBE_KEY = "test-unsubscribe-key"
# RFC 5322 2.1.1: a line MUST be at most 998 octets and SHOULD be at most 78.
MAX_LINE = 998
FOLD_AT = 78
# A moment for signatures whose t= a test checks (2026-05-28 20:26:40 UTC).
MOMENT = 1_780_000_000
# A wait that only guards against a hang: no test measures time.
DEADLINE = 60.0

# Modest: an RSA signature costs 0.3 ms, a dkimpy verification a few ms.
PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- keys ------------------------------------------------------------------------------


def pem(key: Any, password: bytes | None = None) -> bytes:
    """`key` as PKCS #8 PEM, encrypted with `password` if one is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    return data


def txt_record(key: rsa.RSAPrivateKey) -> str:
    """The DKIM TXT record of `key`, made here (RFC 6376 3.6.1): p= its DER SPKI in base64."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"


def _probably_prime(n: int, rng: random.Random) -> bool:
    if n % 2 == 0:
        return n == 2
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(40):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in {1, n - 1}:
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(bits: int, rng: random.Random) -> int:
    """A prime of exactly `bits` bits whose top two bits are set (so p * q has 2 * bits)."""
    while True:
        candidate = rng.getrandbits(bits) | (3 << (bits - 2)) | 1
        if (candidate - 1) % 65537 and _probably_prime(candidate, rng):
            return candidate


@pytest.fixture(scope="session")
def rsa_2048() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def rsa_1024() -> rsa.RSAPrivateKey:
    # RFC 8301's minimum, which dkim.py accepts: weak is the point here.
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505


@pytest.fixture(scope="session")
def rsa_512() -> rsa.RSAPrivateKey:
    """A 512-bit RSA key: `cryptography` no longer makes one, so it is built from two primes."""
    rng = random.SystemRandom()
    p, q = _prime(256, rng), _prime(256, rng)
    d = pow(65537, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p=p,
        q=q,
        d=d,
        dmp1=rsa.rsa_crt_dmp1(d, p),
        dmq1=rsa.rsa_crt_dmq1(d, q),
        iqmp=rsa.rsa_crt_iqmp(p, q),
        public_numbers=rsa.RSAPublicNumbers(65537, p * q),
    )
    key = numbers.private_key()
    assert key.key_size == 512
    return key


@pytest.fixture(scope="session")
def ed25519_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def signer(rsa_2048: rsa.RSAPrivateKey) -> Signer:
    return Signer(rsa_2048, DOMAIN, SELECTOR)


@pytest.fixture
def key_file(tmp_path: Path, rsa_2048: rsa.RSAPrivateKey) -> Path:
    """The 2048-bit key as dkim.pem beside config.toml, readable by this user only."""
    path = tmp_path / "dkim.pem"
    path.write_bytes(pem(rsa_2048))
    path.chmod(0o600)
    return path


def dkim_section(**overrides: Any) -> dict[str, Any]:
    """[dkim] signing as example.org (From's domain) with dkim.pem beside the config."""
    return {"domain": DOMAIN, "selector": SELECTOR, "private_key_file": "dkim.pem", **overrides}


# -- verifying with dkimpy ---------------------------------------------------------------


def txt_lookup(name: str, record: str) -> Callable[..., bytes | None]:
    """A DNS that holds one TXT record, asked as dkimpy asks: the name with its final dot."""

    def lookup(qname: bytes, timeout: int = 5) -> bytes | None:
        return record.encode("ascii") if qname == f"{name}.".encode("ascii") else None

    return lookup


def verifies(message: bytes, name: str, record: str) -> bool:
    """dkimpy's verdict on the first DKIM-Signature of `message`, the key at `name`."""
    return bool(dkim.verify(message, dnsfunc=txt_lookup(name, record)))


def signed_by(signer: Signer, message: bytes) -> bool:
    return verifies(message, *signer.dns_record())


def not_verified(messages: Iterable[bytes], name: str, record: str) -> list[int]:
    """The positions of the messages dkimpy does not verify: [] when all do."""
    lookup = txt_lookup(name, record)
    return [i for i, data in enumerate(messages) if not dkim.verify(data, dnsfunc=lookup)]


def signature_field(message: bytes) -> bytes:
    """The DKIM-Signature field on top of `message`, folds kept, without its final CRLF."""
    assert message.startswith(b"DKIM-Signature: "), message[:80]
    end = re.search(rb"\r\n(?![ \t])", message)
    assert end is not None
    return message[: end.start()]


def signature_tags(message: bytes) -> dict[bytes, bytes]:
    """The tags of the DKIM-Signature on top of `message`, folding whitespace removed."""
    value = signature_field(message).partition(b":")[2]
    tags: dict[bytes, bytes] = parse_tag_value(re.sub(rb"\r\n[ \t]+", b"", value))
    return {name: re.sub(rb"[ \t]", b"", tag) for name, tag in tags.items()}


def field_names(message: bytes) -> list[str]:
    """The names of the header fields of `message`, lower case, in order."""
    head = message.partition(b"\r\n\r\n")[0]
    fields = re.split(rb"\r\n(?![ \t])", head)
    return [field.partition(b":")[0].strip().lower().decode("ascii") for field in fields]


# -- messages as mime.py builds them ----------------------------------------------------------


def make_campaign(*, https: bool = False, reply_to: bool = False) -> CampaignSettings:
    data: dict[str, Any] = {
        "id": "karaganda-2003",
        "from": "Solidarity Committee <appeal@example.org>",
        "list_id": "Solidarity <appeal.lists.example.org>",
        "unsubscribe_mailto": "unsubscribe@example.org",
    }
    if https:
        data["unsubscribe_url"] = UNSUBSCRIBE_URL
        data["unsubscribe_key"] = SecretStr(UNSUBSCRIBE_KEY)
    if reply_to:
        data["reply_to"] = "Press Office <press@example.org>"
    return CampaignSettings.model_validate(data)


def build(
    *,
    name: str = "",
    email: str = ADDRESS,
    subject: str = SUBJECT,
    text: str = TEXT,
    html: str | None = None,
    https: bool = False,
    reply_to: bool = False,
) -> bytes:
    """Wire bytes as a run makes them, before signing: CRLF, not dot-stuffed."""
    builder = MessageBuilder(
        make_campaign(https=https, reply_to=reply_to), unsubscribe_key=UNSUBSCRIBE_KEY.encode()
    )
    message = RenderedMessage(
        recipient=Recipient(email=email, line=2, name=name),
        step="appeal",
        subject=subject,
        text=text,
        html=html,
    )
    return builder.build(
        message,
        message_id=builder.message_id("appeal", email),
        date=datetime(2026, 5, 28, 9, 30, tzinfo=UTC),
    )


def insert_field(message: bytes, field: bytes, *, where: str) -> bytes:
    """`message` with `field` added: "top" just below DKIM-Signature, "bottom" last of all."""
    top = where == "top"
    end = len(signature_field(message)) + 2 if top else message.index(b"\r\n\r\n") + 2
    return message[:end] + field + b"\r\n" + message[end:]


# -- signatures dkimpy verifies ------------------------------------------------------------


def test_a_plain_text_message_is_signed_so_that_dkimpy_verifies_it(signer: Signer) -> None:
    """A one-part text/plain message, signed, passes dkimpy's verification."""
    signed = signer.sign(build())
    assert signed_by(signer, signed)


def test_a_multipart_message_with_non_ascii_name_and_subject_verifies(signer: Signer) -> None:
    """multipart/alternative (text and html), a Kazakh name, a Cyrillic subject, one-click URL."""
    raw = build(
        name=KAZAKH_NAME,
        subject=RUSSIAN_SUBJECT,
        text="Құрметті жолдас,\n\nПожалуйста, перешлите это письмо.\n",
        html="<p>Құрметті жолдас,</p>\n<p>Пожалуйста, перешлите это письмо.</p>\n",
        https=True,
    )
    assert b"multipart/alternative" in raw
    signed = signer.sign(raw)
    assert signed_by(signer, signed)


def test_signing_adds_one_field_on_top_and_leaves_the_message_as_it_was(signer: Signer) -> None:
    """The signed message is the DKIM-Signature field followed by the message, byte for byte."""
    raw = build(name=KAZAKH_NAME)
    signed = signer.sign(raw)
    field = signature_field(signed)
    assert signed == field + b"\r\n" + raw
    assert signed.count(b"DKIM-Signature:") == 1


def test_a_1024_bit_key_the_smallest_allowed_signs_what_dkimpy_verifies(
    rsa_1024: rsa.RSAPrivateKey,
) -> None:
    """RFC 8301's minimum, 1024 bits, works end to end (and dkimpy's own minimum is 1024)."""
    small = Signer(rsa_1024, DOMAIN, SELECTOR)
    assert small.bits == 1024
    assert signed_by(small, small.sign(build()))


def test_the_dns_record_is_the_public_key_at_selector_domainkey_domain(
    signer: Signer, rsa_2048: rsa.RSAPrivateKey
) -> None:
    """dns_record(): SELECTOR._domainkey.DOMAIN and v=DKIM1; k=rsa; p=<DER SPKI in base64>."""
    assert signer.dns_record() == (DNS_NAME, txt_record(rsa_2048))


def test_a_signature_does_not_verify_against_another_key(
    signer: Signer, rsa_2048: rsa.RSAPrivateKey, rsa_1024: rsa.RSAPrivateKey
) -> None:
    """The verifier is not lenient: the right message under a different published key fails."""
    signed = signer.sign(build())
    assert not verifies(signed, DNS_NAME, txt_record(rsa_1024))
    assert verifies(signed, DNS_NAME, txt_record(rsa_2048))


def pieces(alphabet: list[str], *, min_size: int = 0, max_size: int) -> st.SearchStrategy[str]:
    """Strings of `alphabet`'s pieces, some of more than one character ("  ", "=?")."""
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=max_size).map("".join)


# Names and subjects as lists.py and render.py let them through: no controls, stripped.
_HEADER_SAFE = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"))
_HEADER_TEXT = st.one_of(
    st.text(_HEADER_SAFE, max_size=40),
    pieces([*"aZ .,;:\"'\\<>()@=?", "  ", "Ж", "Қ", "字", "😀", "=?"], max_size=90),
)
_NAMES = _HEADER_TEXT.map(str.strip)
_SUBJECTS = _HEADER_TEXT.map(str.strip).filter(bool)
# Lines full of what relaxed canonicalization changes: trailing WSP, tabs, runs of spaces.
_LINES = st.one_of(
    pieces(["a", ".", " ", "  ", "\t", "é", "ж"], max_size=30),
    st.tuples(
        st.text(st.sampled_from(["a", "b", " ", "\t", "."]), max_size=20),
        st.sampled_from([" ", "  ", "\t", " \t ", "\t\t", ""]),
    ).map("".join),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
)
_TEXTS = st.tuples(st.lists(_LINES, max_size=8), st.integers(min_value=0, max_value=3)).map(
    lambda parts: "\n".join(parts[0]) + "\n" * parts[1]
)


@PROPERTY
@given(
    name=_NAMES,
    subject=_SUBJECTS,
    text=_TEXTS,
    html=st.none() | _TEXTS,
    https=st.booleans(),
    reply_to=st.booleans(),
)
@example(
    name="  Ann \t Lee ",
    subject="a  b\t c",
    text="trailing   \nand\ttab \t\n\n\n",
    html=None,
    https=False,
    reply_to=False,
)
@example(name="", subject="x", text="", html="", https=True, reply_to=True)
def test_every_message_mime_builds_verifies_once_signed(  # noqa: PLR0917  # given's arguments
    signer: Signer,
    name: str,
    subject: str,
    text: str,
    html: str | None,
    https: bool,
    reply_to: bool,
) -> None:
    """Any name, subject and body (WSP runs, trailing WSP, empty lines at the end) verifies."""
    raw = build(name=name, subject=subject, text=text, html=html, https=https, reply_to=reply_to)
    assert signed_by(signer, signer.sign(raw))


# -- tampering ------------------------------------------------------------------------------


def test_changing_one_byte_of_the_body_breaks_the_signature(signer: Signer) -> None:
    """The body hash covers the body: "Please" made "please" no longer verifies."""
    signed = signer.sign(build())
    start = signed.index(b"\r\n\r\nPlease") + 4
    tampered = signed[:start] + b"p" + signed[start + 1 :]
    assert tampered != signed
    assert not signed_by(signer, tampered)


def test_changing_the_subject_breaks_the_signature(signer: Signer) -> None:
    """The Subject is signed: one word changed no longer verifies."""
    signed = signer.sign(build())
    tampered = signed.replace(
        b"Subject: Free the Karaganda three", b"Subject: Free the Karaganda two"
    )
    assert tampered != signed
    assert not signed_by(signer, tampered)


@pytest.mark.parametrize(
    "field",
    [
        b"From: Treasurer <treasurer@example.org>",
        b"Subject: Donate here instead",
        b"List-Unsubscribe: <https://attacker.example.net/u>",
    ],
    ids=["From", "Subject", "List-Unsubscribe"],
)
@pytest.mark.parametrize("where", ["top", "bottom"])
def test_adding_a_second_signed_field_breaks_the_signature(
    signer: Signer, field: bytes, where: str
) -> None:
    """Oversigning (RFC 6376 8.15): a second From, Subject or List-Unsubscribe anywhere fails.

    h= lists each name once more than it occurs, so the extra entry signs "no
    such field": an added one, above or below, takes its place.
    """
    signed = signer.sign(build(https=True))
    name = field.partition(b":")[0].lower().decode("ascii")
    listed = signature_tags(signed)[b"h"].decode("ascii").split(":")
    assert listed.count(name) == 2
    tampered = insert_field(signed, field, where=where)
    assert field_names(tampered).count(name) == 2
    assert not signed_by(signer, tampered)


@pytest.mark.parametrize(
    "field",
    [b"Reply-To: someone@attacker.example", b"Cc: more@example.net", b"Sender: x@example.net"],
)
def test_adding_a_reply_to_cc_or_sender_the_message_lacks_breaks_the_signature(
    signer: Signer, field: bytes
) -> None:
    """Signed as absent (RFC 6376 8.15): a replayed copy cannot gain a Reply-To elsewhere."""
    signed = signer.sign(build(reply_to=False))
    assert signed_by(signer, signed)
    assert not signed_by(signer, insert_field(signed, field, where="bottom"))


def test_a_field_the_message_does_not_have_may_be_added_without_breaking_it(
    signer: Signer,
) -> None:
    """What relays add (Received, X-...) is not signed: the signature still verifies.

    So the failures above come from the oversigned names, not from any change.
    """
    signed = signer.sign(build())
    relayed = insert_field(
        signed, b"Received: from relay.example.net by mx.example.org", where="top"
    )
    relayed = insert_field(relayed, b"X-Spam-Score: 0.1", where="bottom")
    assert signed_by(signer, relayed)


def test_what_relaxed_canonicalization_ignores_may_change(signer: Signer) -> None:
    """c=relaxed/relaxed: refolding, the case of names, WSP runs, trailing WSP, empty lines."""
    signed = signer.sign(build(text="Please forward this appeal.\nThank you.\n"))
    assert b"Subject: Free the Karaganda three\r\n" in signed
    changed = signed.replace(
        b"Subject: Free the Karaganda three\r\n",
        b"SUBJECT:   Free  the\r\n\tKaraganda three \t\r\n",
    )
    changed = changed.replace(
        b"Please forward this appeal.\r\n", b"Please  forward\tthis appeal. \t\r\n"
    )
    changed += b"\r\n \r\n\r\n"
    assert changed != signed
    assert signed_by(signer, changed)


# -- relaxed canonicalization, against dkimpy's own ----------------------------------------------

# Bodies as mime.py writes them: CRLF line endings, a final CRLF (or nothing at all).
_BODIES = [
    b"",
    b"\r\n",
    b"\r\n\r\n\r\n",
    b" \r\n",
    b"\t \r\n \r\n",
    b"text\r\n",
    b"text  \r\n",
    b"text \t \r\n",
    b"a  b\t\tc   d\r\n",
    b"\tindented\r\n  indented\r\n",
    b"line\r\n\r\n\r\n",
    b"line \r\n \r\n\t\r\n\r\n",
    b"one\r\n\r\ntwo\r\n",
    b".\r\n..\r\n. \r\n",
    "кириллица  с   пробелами \r\n\r\n".encode(),
]


@pytest.mark.parametrize("body", _BODIES)
def test_relaxed_body_is_dkimpys_relaxed_body(body: bytes) -> None:
    """_relaxed_body equals dkimpy's Relaxed.canonicalize_body on every body mime.py can write."""
    assert _relaxed_body(body) == Relaxed.canonicalize_body(body)


_BODY_LINES = st.lists(
    pieces(["a", ".", " ", "  ", "\t", "é", "ж", "="], max_size=12).map(str.encode),
    max_size=8,
)


@PROPERTY
@given(lines=_BODY_LINES, empty_lines=st.integers(min_value=0, max_value=3))
def test_relaxed_body_matches_dkimpy_on_generated_bodies(
    lines: list[bytes], empty_lines: int
) -> None:
    """Any CRLF body of spaces, tabs, dots and letters canonicalizes as dkimpy's does."""
    body = b"".join(line + b"\r\n" for line in lines) + b"\r\n" * empty_lines
    assert _relaxed_body(body) == Relaxed.canonicalize_body(body)


def dkimpy_relaxed_field(field: bytes) -> bytes:
    """One header field as dkimpy parses and canonicalizes it: name, colon, value, CRLF."""
    headers, _ = dkim.rfc822_parse(field + b"\r\n\r\n")
    assert len(headers) == 1, headers
    ((name, value),) = Relaxed.canonicalize_headers(headers)
    result: bytes = name + b":" + value
    return result


_FIELDS = [
    b"Subject: plain",
    b"Subject:no space",
    b"subject:   runs  of \t spaces   ",
    b"Subject: folded\r\n continued\r\n\tand again \t",
    b"To: =?utf-8?b?0JXRgNC70LDQvQ==?=\r\n =?utf-8?b?0JrQsNGB0YvQvA==?= <member@example.org>",
    b"List-Unsubscribe: <https://lists.example.org/u?e=a%40b&t=x>,\r\n <mailto:u@example.org>",
    b"MIME-Version: 1.0",
    b"X-Empty:",
    b"X-Empty-After-Space: \t ",
]


@pytest.mark.parametrize("field", _FIELDS)
def test_relaxed_field_is_dkimpys_relaxed_header(field: bytes) -> None:
    """_relaxed_field equals dkimpy's Relaxed.canonicalize_headers, folds and WSP runs too."""
    assert _relaxed_field(field) == dkimpy_relaxed_field(field)


_FIELD_WORDS = pieces([*"aZ09:;=?<>@,.", "=?"], min_size=1, max_size=10)
_FIELD_GAPS = st.sampled_from([" ", "  ", "\t", " \t ", "\r\n ", "\r\n\t", "\r\n  \t"])


@PROPERTY
@given(
    name=st.sampled_from(["Subject", "To", "From", "List-Unsubscribe", "X-Anything"]),
    lead=st.sampled_from(["", " ", "  ", "\t"]),
    words=st.lists(st.tuples(_FIELD_WORDS, _FIELD_GAPS), max_size=6),
    tail=st.sampled_from(["", " ", "\t", " \t"]),
)
def test_relaxed_field_matches_dkimpy_on_generated_fields(
    name: str, lead: str, words: list[tuple[str, str]], tail: str
) -> None:
    """Any field of words, WSP runs and folds canonicalizes as dkimpy's does."""
    value = lead + "".join(word + gap for word, gap in words).rstrip(" \t\r\n") + tail
    field = f"{name}:{value}".encode("ascii")
    assert _relaxed_field(field) == dkimpy_relaxed_field(field)


# -- the DKIM-Signature field ------------------------------------------------------------------


def test_the_signature_says_v1_rsa_sha256_relaxed_and_who_signs_when(
    rsa_2048: rsa.RSAPrivateKey,
) -> None:
    """v=1, a=rsa-sha256, c=relaxed/relaxed, d= and s= as configured, t= the signing moment."""
    clocked = Signer(rsa_2048, DOMAIN, SELECTOR, clock=lambda: MOMENT + 0.9)
    signed = clocked.sign(build())
    tags = signature_tags(signed)
    assert tags[b"v"] == b"1"
    assert tags[b"a"] == b"rsa-sha256"
    assert tags[b"c"] == b"relaxed/relaxed"
    assert tags[b"d"] == DOMAIN.encode()
    assert tags[b"s"] == SELECTOR.encode()
    assert tags[b"t"] == str(MOMENT).encode()
    # No l= (a body length would let anyone append to the body), no x= (no expiry).
    assert set(tags) == {b"v", b"a", b"c", b"d", b"s", b"t", b"h", b"bh", b"b"}
    assert signed_by(clocked, signed)


def test_bh_is_the_sha256_of_the_body_as_dkimpy_canonicalizes_it(signer: Signer) -> None:
    """bh= is base64(SHA-256(relaxed body)), the body's canonical form computed by dkimpy."""
    raw = build(text="Dear  friend,\t\n\nplease forward.  \n\n\n", html="<p>x</p>")
    tags = signature_tags(signer.sign(raw))
    body = raw.partition(b"\r\n\r\n")[2]
    expected = base64.b64encode(hashlib.sha256(Relaxed.canonicalize_body(body)).digest())
    assert tags[b"bh"] == expected


@pytest.mark.parametrize("https", [False, True], ids=["mailto", "https"])
@pytest.mark.parametrize("html", [None, "<p>Please forward.</p>\n"], ids=["text", "html"])
def test_h_signs_every_field_of_the_message_and_each_name_once_more(
    signer: Signer, https: bool, html: str | None
) -> None:
    """h= is the message's own field names, then each again, then the absent ones (oversigning).

    It covers From and List-Unsubscribe, and List-Unsubscribe-Post exactly when
    an https unsubscribe URL is configured: RFC 8058 4 wants both signed.
    """
    raw = build(https=https, html=html)
    listed = signature_tags(signer.sign(raw))[b"h"].decode("ascii").split(":")
    names = field_names(raw)
    absent = [
        n for n in ("reply-to", "cc", "sender", "in-reply-to", "references") if n not in names
    ]
    assert listed == names + names + absent
    for name in ("from", "to", "subject", "date", "message-id", "list-unsubscribe", "list-id"):
        assert listed.count(name) == 2, name
    assert ("list-unsubscribe-post" in listed) is https


def _lines(field: bytes) -> list[bytes]:
    return field.split(b"\r\n")


@pytest.mark.parametrize(
    ("https", "reply_to", "html"),
    [
        (False, False, None),
        (False, False, "<p>x</p>"),
        (False, True, None),
        (True, False, "<p>x</p>"),
        (True, True, "<p>x</p>"),
        (True, False, None),
        (True, True, None),
    ],
)
def test_no_line_of_the_signature_is_over_78_characters_for_the_usual_domain(
    signer: Signer, https: bool, reply_to: bool, html: str | None
) -> None:
    """RFC 5322 2.1.1's 78 (the SHOULD mime.py keeps) for every field set mime.py writes."""
    signed = signer.sign(build(https=https, reply_to=reply_to, html=html))
    lines = _lines(signature_field(signed))
    assert len(lines) > 1
    assert [line for line in lines if len(line) > FOLD_AT] == []
    assert signed_by(signer, signed)


def test_no_line_is_over_998_octets_for_the_longest_domain_and_selector_dns_allows(
    rsa_2048: rsa.RSAPrivateKey,
) -> None:
    """A 253-character domain and a 63-character selector: every line within RFC 5322's 998."""
    domain = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(domain) == 253
    selector = "s" * 63
    long_signer = Signer(rsa_2048, domain, selector)
    signed = long_signer.sign(build(https=True, reply_to=True))
    assert max(len(line) for line in signed.split(b"\r\n")) <= MAX_LINE
    assert signed_by(long_signer, signed)


def test_a_long_ordinary_domain_and_selector_are_folded_within_78_characters(
    rsa_2048: rsa.RSAPrivateKey,
) -> None:
    """d=, s= and t= are folded (RFC 6376 3.2 allows FWS between tags) so that lines stay at 78."""
    domain, selector = "campaigns.mail.solidarity-committee.example.org", "appeal2026-rsa2048"
    long_signer = Signer(rsa_2048, domain, selector)
    signed = long_signer.sign(build())
    assert signed_by(long_signer, signed)
    assert [line for line in _lines(signature_field(signed)) if len(line) > FOLD_AT] == []


# -- [dkim] in the config --------------------------------------------------------------------


def config_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(path)
    return excinfo.value


def test_without_a_dkim_section_nothing_is_signed(
    run_cli: CliRun, example_list: Path, smtp_server: RecordingServer, config_file: Path
) -> None:
    """No [dkim]: no signer, and every message goes out without a DKIM-Signature."""
    settings = load_settings(config_file)
    assert settings.dkim == DkimSettings()
    assert Signer.from_settings(settings.dkim, config_file) is None
    result = run_cli("send", str(example_list), "--yes")
    assert result.exit_code == 0, result.output
    assert smtp_server.messages
    for received in smtp_server.messages:
        assert received.data.startswith(b"Date: ")
        assert b"DKIM-Signature" not in received.data


@pytest.mark.parametrize(
    "section",
    [
        {"domain": DOMAIN},
        {"selector": SELECTOR},
        {"domain": DOMAIN, "private_key_file": "dkim.pem"},
        {"selector": SELECTOR, "private_key_file": "dkim.pem"},
        {"private_key_file": "dkim.pem"},
        {"domain": DOMAIN, "selector": SELECTOR},
    ],
    ids=["domain-only", "selector-only", "no-selector", "no-domain", "key-only", "no-key"],
)
def test_an_incomplete_dkim_section_is_refused_naming_it(
    write_config: ConfigWriter, section: dict[str, str]
) -> None:
    """domain and selector come together, with one key: otherwise ConfigError at [dkim]."""
    path = write_config(dkim=section)
    error = config_error(path)
    assert error.key == "[dkim]"
    assert "[dkim]" in str(error)
    assert error.path == path


def test_a_key_file_and_a_key_in_the_environment_together_are_refused(
    write_config: ConfigWriter, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two keys: which one signs would be a guess, so neither does."""
    monkeypatch.setenv("APPEAL_MAILER_DKIM__PRIVATE_KEY", key_file.read_text())
    error = config_error(write_config(dkim=dkim_section()))
    assert error.key == "[dkim]"
    assert "one of the two" in str(error)


def test_the_private_key_in_the_config_file_is_refused_as_a_secret(
    write_config: ConfigWriter, key_file: Path
) -> None:
    """[dkim] private_key in the TOML file: "secrets do not belong in the config file"."""
    path = write_config(dkim={"domain": DOMAIN, "selector": SELECTOR, "private_key": "x"})
    error = config_error(path)
    assert error.key == "[dkim] private_key"
    assert "secrets do not belong in the config file" in str(error)
    assert error.hint is not None
    assert "APPEAL_MAILER_DKIM__PRIVATE_KEY" in error.hint
    assert "dkim__private_key" in error.hint


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("domain", "exa mple.org"),
        ("domain", "-example.org"),
        ("domain", "example..org"),
        ("domain", "exämple.org"),
        ("domain", "example.org/"),
        ("domain", "a" * 64 + ".org"),
        ("selector", "appeal 2026"),
        ("selector", "appeal_2026"),
        ("selector", ""),
    ],
)
def test_a_domain_or_selector_that_is_not_a_dns_name_is_refused(
    write_config: ConfigWriter, key: str, value: str
) -> None:
    """Names go into d=, s= and the DNS: letters, digits, hyphens, labels of 1 to 63."""
    error = config_error(write_config(dkim=dkim_section(**{key: value})))
    assert error.key == f"[dkim] {key}"
    assert "DNS name" in str(error)


def test_a_domain_and_selector_are_taken_in_lower_case_without_the_final_dot(
    write_config: ConfigWriter,
) -> None:
    """A domain written "Example.ORG." signs as d=example.org: DNS names ignore case."""
    settings = load_settings(
        write_config(dkim=dkim_section(domain="Example.ORG.", selector="Appeal2026"))
    )
    assert (settings.dkim.domain, settings.dkim.selector) == (DOMAIN, SELECTOR)


def test_a_domain_longer_than_dns_allows_is_refused(write_config: ConfigWriter) -> None:
    """A 1,023-character domain (16 labels of 63) cannot be in the DNS: ConfigError."""
    domain = ".".join(["a" * 63] * 16)
    error = config_error(write_config(dkim=dkim_section(domain=domain)))
    assert error.key == "[dkim] domain"


def test_the_key_file_is_found_beside_the_config_file_from_any_directory(
    tmp_path: Path,
    write_config: ConfigWriter,
    rsa_2048: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """private_key_file relative to the config file's folder, not to where cron runs."""
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "dkim.pem").write_bytes(pem(rsa_2048))
    path = write_config(dkim=dkim_section(private_key_file="keys/dkim.pem"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(path)
    assert settings.dkim.private_key_file == tmp_path / "keys" / "dkim.pem"
    loaded = Signer.from_settings(settings.dkim, path)
    assert loaded is not None
    assert loaded.dns_record() == (DNS_NAME, txt_record(rsa_2048))


def _send_signed(
    run_cli: CliRun,
    list_path: Path,
    server: RecordingServer,
    record: str,
    *,
    verbose: bool = False,
) -> str:
    """`send LIST --yes`: exit 0, each recipient once, each message verified; the output.

    `verbose`: with -vv, so that every message is logged (and the key must be in none).
    """
    result = run_cli(*(["-vv"] if verbose else []), "send", str(list_path), "--yes")
    assert result.exit_code == 0, result.output
    counts = server.count_by_recipient()
    assert counts
    assert set(counts.values()) == {1}
    assert not_verified((m.data for m in server.messages), DNS_NAME, record) == []
    return result.output


def test_a_key_from_the_environment_signs_and_never_shows(  # noqa: PLR0917  # pytest fixtures
    run_cli: CliRun,
    write_config: ConfigWriter,
    example_list: Path,
    smtp_server: RecordingServer,
    rsa_2048: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """APPEAL_MAILER_DKIM__PRIVATE_KEY: the key itself, no file; every message verifies."""
    monkeypatch.setenv("APPEAL_MAILER_DKIM__PRIVATE_KEY", pem(rsa_2048).decode("ascii"))
    config = write_config(dkim={"domain": DOMAIN, "selector": SELECTOR})
    output = _send_signed(run_cli, example_list, smtp_server, txt_record(rsa_2048), verbose=True)
    assert_no_key(output, pem(rsa_2048))
    assert_no_key(json.dumps(ledger_summaries(config.parent / "ledger.db")), pem(rsa_2048))


def test_a_key_from_the_secrets_directory_signs(  # noqa: PLR0917  # pytest fixtures
    run_cli: CliRun,
    write_config: ConfigWriter,
    example_list: Path,
    smtp_server: RecordingServer,
    rsa_2048: rsa.RSAPrivateKey,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The file dkim__private_key in $APPEAL_MAILER_SECRETS_DIR: every message verifies."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "dkim__private_key").write_bytes(pem(rsa_2048))
    monkeypatch.setenv("APPEAL_MAILER_SECRETS_DIR", str(secrets))
    write_config(dkim={"domain": DOMAIN, "selector": SELECTOR})
    output = _send_signed(run_cli, example_list, smtp_server, txt_record(rsa_2048))
    assert_no_key(output, pem(rsa_2048))


# An EC key on secp112r1 (`openssl ecparam -name secp112r1 -genkey -noout`), a
# curve OpenSSL can write but `cryptography` will not load (UnsupportedAlgorithm).
EC_SECP112R1 = b"""-----BEGIN EC PRIVATE KEY-----
MD4CAQEEDgYCpCMvj1oTCkcEGaEIoAcGBSuBBAAGoSADHgAEhKKq1sAocz+/b1K2
JGFnkrQqJUQUuGSuMWpG4w==
-----END EC PRIVATE KEY-----
"""


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (None, "cannot read the DKIM key"),
        (lambda keys: b"this is not a key\n", "not a PEM private key"),
        (lambda keys: pem(keys["rsa_2048"], b"passphrase"), "protected by a passphrase"),
        (lambda keys: pem(keys["ed25519"]), "not an RSA key"),
        (lambda keys: pem(keys["rsa_512"]), "has 512 bits"),
        (lambda keys: EC_SECP112R1, "not an RSA key"),
    ],
    ids=["missing", "not-pem", "passphrase", "ed25519", "512-bit", "unsupported-curve"],
)
def test_a_bad_key_file_stops_send_and_check_before_anything_is_sent(  # noqa: PLR0917  # pytest fixtures
    run_cli: CliRun,
    write_config: ConfigWriter,
    example_list: Path,
    smtp_server: RecordingServer,
    tmp_path: Path,
    rsa_2048: rsa.RSAPrivateKey,
    rsa_512: rsa.RSAPrivateKey,
    ed25519_key: ed25519.Ed25519PrivateKey,
    make: Callable[[dict[str, Any]], bytes] | None,
    says: str,
) -> None:
    """A missing, non-PEM, encrypted, Ed25519, 512-bit or unloadable EC key: exit 1, file, hint.

    The recording server receives nothing, not even a connection.
    """
    key_path = tmp_path / "dkim.pem"
    if make is not None:
        key_path.write_bytes(
            make({"rsa_2048": rsa_2048, "rsa_512": rsa_512, "ed25519": ed25519_key})
        )
    config = write_config(dkim=dkim_section())
    for command in (("send", str(example_list), "--yes"), ("check", "--no-smtp")):
        result = run_cli(*command)
        assert result.exit_code == 1, result.output
        assert says in result.stderr
        assert str(key_path) in result.stderr
        assert "hint: " in result.stderr
        if make is None:  # no file to name the error after: the config's key, the file in the hint
            assert f"{config}: [dkim] private_key_file" in result.stderr
    assert smtp_server.messages == []
    assert smtp_server.connections == 0


def test_a_bad_key_in_the_environment_is_refused_without_showing_it(
    run_cli: CliRun,
    write_config: ConfigWriter,
    example_list: Path,
    smtp_server: RecordingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A secret that is not a key: exit 1 at [dkim] private_key, the secret not repeated."""
    monkeypatch.setenv("APPEAL_MAILER_DKIM__PRIVATE_KEY", "hunter2-not-a-key")
    config = write_config(dkim={"domain": DOMAIN, "selector": SELECTOR})
    result = run_cli("send", str(example_list), "--yes")
    assert result.exit_code == 1, result.output
    assert "not a PEM private key" in result.stderr
    assert f"{config}: [dkim] private_key" in result.stderr
    assert "hunter2" not in result.output
    assert smtp_server.connections == 0


# -- end to end: send and preview --------------------------------------------------------------


def assert_no_key(text: str | bytes, key_pem: bytes) -> None:
    """No line of the key's PEM body (64 base64 characters each) is anywhere in `text`."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    body = [line for line in key_pem.splitlines() if line and not line.startswith(b"-----")]
    assert len(body) > 10
    leaked = [line for line in body if line in data]
    assert leaked == []


def ledger_summaries(path: Path) -> list[dict[str, Any]]:
    ledger = Ledger.open(f"sqlite:///{path}")
    try:
        return [run.summary for run in ledger.recent_runs("test-campaign", limit=100)]
    finally:
        ledger.close()


def ledger_counts(path: Path) -> dict[str, int]:
    ledger = Ledger.open(f"sqlite:///{path}")
    try:
        return ledger.counts("test-campaign")
    finally:
        ledger.close()


def test_send_delivers_every_message_signed_and_verified_exactly_once(  # noqa: PLR0917  # pytest fixtures
    run_cli: CliRun,
    write_config: ConfigWriter,
    key_file: Path,
    example_list: Path,
    smtp_server: RecordingServer,
    rsa_2048: rsa.RSAPrivateKey,
) -> None:
    """`send LIST --yes` with [dkim]: each of the 27 recipients gets one message, verified."""
    config = write_config(dkim=dkim_section())
    output = _send_signed(run_cli, example_list, smtp_server, txt_record(rsa_2048), verbose=True)
    with example_list.open(encoding="utf-8") as handle:
        listed = {row["email"] for row in csv.DictReader(handle)}
    assert set(smtp_server.count_by_recipient()) == listed
    for received in smtp_server.messages:
        tags = signature_tags(received.data)
        assert (tags[b"d"], tags[b"s"]) == (DOMAIN.encode(), SELECTOR.encode())
    assert_no_key(output, key_file.read_bytes())
    assert_no_key(json.dumps(ledger_summaries(config.parent / "ledger.db")), key_file.read_bytes())
    assert ledger_counts(config.parent / "ledger.db") == {"sent": len(listed)}


def test_in_a_terminal_the_plan_says_who_signs(
    write_config: ConfigWriter,
    key_file: Path,
    example_list: Path,
    smtp_server: RecordingServer,
    tmp_path: Path,
) -> None:
    """The plan `send` shows before it asks names the DKIM domain and selector."""
    config = write_config(dkim=dkim_section())
    shown = _run_in_terminal(["--config", str(config), "send", str(example_list)], "n", tmp_path)
    assert f"Signed:     DKIM, d={DOMAIN} s={SELECTOR}" in shown
    assert "Nothing sent." in shown
    assert smtp_server.messages == []


def test_reminders_that_cron_sends_are_signed_too(  # noqa: PLR0917  # pytest fixtures
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    key_file: Path,
    smtp_server: RecordingServer,
    rsa_2048: rsa.RSAPrivateKey,
) -> None:
    """`remind`, past a reminder's `after`: its messages are signed as the appeal's were."""
    config = write_config(dkim=dkim_section(), reminders=[{"name": "reminder", "after": "3 days"}])
    people = [{"email": f"m{i}@example.org", "name": f"Member {i}"} for i in range(4)]
    _send_signed(run_cli, write_list(people), smtp_server, txt_record(rsa_2048))
    due = (datetime.now(UTC) + timedelta(days=3, minutes=5)).isoformat()
    result = run_cli("remind", "--yes", "--now", due, config=config)
    assert result.exit_code == 0, result.output
    assert len(smtp_server.messages) == 2 * len(people)
    reminders = smtp_server.messages[len(people) :]
    assert not_verified((m.data for m in reminders), DNS_NAME, txt_record(rsa_2048)) == []
    assert len({signature_tags(m.data)[b"b"] for m in smtp_server.messages}) == 2 * len(people)


def test_a_domains_rate_limit_still_spaces_its_signed_messages(  # noqa: PLR0917  # pytest fixtures
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    key_file: Path,
    smtp_server: RecordingServer,
    rsa_2048: rsa.RSAPrivateKey,
) -> None:
    """A domain's own lane waits for each signature: its paced messages never go out in a burst.

    Signed messages wait for their signatures in order; held back behind the
    next ones, a slow domain's paced messages all left together at its lane's end.
    """
    write_config(dkim=dkim_section(), sending={"rate": 0, "domain_limits": {"slow.example": 10}})
    slow = [{"email": f"s{i}@slow.example", "name": f"S {i}"} for i in range(6)]
    fast = [{"email": f"f{i}@fast.example", "name": f"F {i}"} for i in range(6)]
    _send_signed(run_cli, write_list(slow + fast), smtp_server, txt_record(rsa_2048))
    arrived = sorted(
        m.received_at for m in smtp_server.messages if m.rcpt_tos[0].endswith("@slow.example")
    )
    assert len(arrived) == len(slow)
    # 10 a second: each at least about 0.1 s after the one before (a burst: 0).
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrived)]
    assert min(gaps) >= 0.08, gaps


def test_personal_html_messages_with_one_click_unsubscribe_are_signed(  # noqa: PLR0917  # pytest fixtures
    run_cli: CliRun,
    write_config: ConfigWriter,
    key_file: Path,
    example_list: Path,
    smtp_server: RecordingServer,
    rsa_2048: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The protest template (text and html, personal): List-Unsubscribe-Post signed too."""
    monkeypatch.setenv("APPEAL_MAILER_CAMPAIGN__UNSUBSCRIBE_KEY", UNSUBSCRIBE_KEY)
    write_config(
        dkim=dkim_section(),
        campaign={"unsubscribe_url": UNSUBSCRIBE_URL, "template": "protest"},
    )
    _send_signed(run_cli, example_list, smtp_server, txt_record(rsa_2048))
    for received in smtp_server.messages:
        assert b"multipart/alternative" in received.data
        listed = signature_tags(received.data)[b"h"].decode("ascii").split(":")
        assert listed.count("list-unsubscribe") == listed.count("list-unsubscribe-post") == 2


def test_dots_and_trailing_whitespace_survive_smtp_and_still_verify(  # noqa: PLR0917  # pytest fixtures
    run_cli: CliRun,
    write_config: ConfigWriter,
    key_file: Path,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    rsa_2048: rsa.RSAPrivateKey,
    tmp_path: Path,
) -> None:
    """Signed before dot-stuffing, read after un-stuffing: lines of dots and WSP still verify."""
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "dots.txt.j2").write_text(
        "Subject: Dots  and   spaces\n\n"
        ".\n..\n. leading dot\nTrailing spaces   \nTrailing tab\t\n"
        "Runs   of \t white  space\n\n\n",
        encoding="utf-8",
    )
    write_config(dkim=dkim_section(), campaign={"templates": str(templates), "template": "dots"})
    people = write_list([{"email": f"dots{i}@example.org", "name": f"Dot {i}"} for i in range(5)])
    _send_signed(run_cli, people, smtp_server, txt_record(rsa_2048))
    assert all(b"\r\n..\r\n" in m.data for m in smtp_server.messages)


def test_a_dry_run_writes_eml_files_that_verify_and_no_key_anywhere(  # noqa: PLR0917  # pytest fixtures
    run_cli: CliRun,
    write_config: ConfigWriter,
    example_list: Path,
    smtp_server: RecordingServer,
    rsa_2048: rsa.RSAPrivateKey,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`send --dry-run --out DIR`: each .eml is signed as it would be sent; no file has the key."""
    key_pem = pem(rsa_2048)
    monkeypatch.setenv("APPEAL_MAILER_DKIM__PRIVATE_KEY", key_pem.decode("ascii"))
    write_config(dkim={"domain": DOMAIN, "selector": SELECTOR})
    out = tmp_path / "preview"
    result = run_cli("-vv", "send", str(example_list), "--dry-run", "--out", str(out))
    assert result.exit_code == 0, result.output
    emls = sorted(out.glob("*.eml"))
    assert len(emls) == 27
    assert not_verified((path.read_bytes() for path in emls), DNS_NAME, txt_record(rsa_2048)) == []
    assert smtp_server.connections == 0
    assert_no_key(result.output, key_pem)
    for path in out.iterdir():
        assert_no_key(path.read_bytes(), key_pem)
    assert {"index.csv", "summary.txt"} <= {path.name for path in out.iterdir()}


# -- appeal-mailer check ---------------------------------------------------------------------


_PUBLISH = re.compile(r"^dkim: the DNS must publish: (\S+)\. IN TXT ((?:\"[^\"]*\" ?)+)$", re.M)


def printed_record(output: str) -> tuple[str, list[str]]:
    """The DNS name and the TXT record's quoted pieces, as `check` printed them."""
    match = _PUBLISH.search(output)
    assert match is not None, output
    return match.group(1), re.findall(r"\"([^\"]*)\"", match.group(2))


def test_check_prints_the_dns_record_that_verifies_what_send_signs(  # noqa: PLR0917  # pytest fixtures
    run_cli: CliRun,
    write_config: ConfigWriter,
    key_file: Path,
    example_list: Path,
    smtp_server: RecordingServer,
    rsa_2048: rsa.RSAPrivateKey,
    loopback_dns: LoopbackDns,
) -> None:
    """`check --no-smtp` prints SELECTOR._domainkey.DOMAIN and a TXT record, p= the public key.

    Published as printed (in its quoted pieces), `check` finds it, and dkimpy,
    looking it up in the DNS itself, verifies every message `send` delivers.
    """
    write_config(dkim=dkim_section())
    result = run_cli("check", "--no-smtp")
    assert result.exit_code == 0, result.output
    assert f"dkim: signing as d={DOMAIN} s={SELECTOR}, RSA key of 2048 bits" in result.stdout
    name, pieces = printed_record(result.stdout)
    assert name == DNS_NAME
    assert all(len(piece) <= 255 for piece in pieces)  # RFC 1035 3.3.14: one string's limit
    assert len(pieces) == 2  # a 2048-bit key's record does not fit one
    tags = parse_tag_value("".join(pieces).encode("ascii"))
    expected = parse_tag_value(txt_record(rsa_2048).encode("ascii"))
    assert tags[b"p"] == expected[b"p"]
    assert (tags[b"v"], tags[b"k"]) == (b"DKIM1", b"rsa")
    assert "are not one inside the other" not in result.stdout
    assert_no_key(result.output, key_file.read_bytes())

    loopback_dns.publish(name, pieces)
    result = run_cli("check", "--no-smtp")
    assert result.exit_code == 0, result.output
    assert f"dkim: {DNS_NAME} publishes this key" in result.stdout
    result = run_cli("send", str(example_list), "--yes")
    assert result.exit_code == 0, result.output
    assert len(smtp_server.messages) == 27
    assert [m for m in smtp_server.messages if not dkim.verify(m.data)] == []
    assert f"{DNS_NAME}." in loopback_dns.asked


@pytest.mark.parametrize(
    ("sender", "domain", "warns"),
    [
        ("appeal@example.org", "example.org", False),
        ("appeal@mail.example.org", "example.org", False),
        ("appeal@a.b.example.org", "b.example.org", False),
        ("appeal@Example.ORG", "example.org", False),
        ("appeal@example.org", "news.example.org", False),
        ("appeal@example.org", "example.net", True),
        ("appeal@notexample.org", "example.org", True),
    ],
)
def test_check_warns_when_the_signing_domain_does_not_align_with_from(  # noqa: PLR0917  # pytest fixtures
    run_cli: CliRun,
    write_config: ConfigWriter,
    key_file: Path,
    loopback_dns: LoopbackDns,
    sender: str,
    domain: str,
    warns: bool,
) -> None:
    """d= and From's domain one inside the other, or `check` warns (DMARC), naming both."""
    write_config(dkim=dkim_section(domain=domain), campaign={"from": f"Committee <{sender}>"})
    result = run_cli("check", "--no-smtp")
    assert result.exit_code == 0, result.output
    assert f"dkim: signing as d={domain} " in result.stdout
    warning = (
        f"dkim: warning: d={domain} and From's domain ({sender.split('@')[1].lower()}) "
        "are not one inside the other"
    )
    assert (warning in result.stdout) is warns


def test_check_does_not_warn_for_a_subdomain_of_the_same_organization(
    run_cli: CliRun, write_config: ConfigWriter, key_file: Path, loopback_dns: LoopbackDns
) -> None:
    """d=news.example.org and From example.org share the organizational domain: aligned."""
    write_config(dkim=dkim_section(domain="news.example.org"))
    result = run_cli("check", "--no-smtp")
    assert result.exit_code == 0, result.output
    assert "dkim: signing as d=news.example.org " in result.stdout
    assert "are not one inside the other" not in result.stdout


def _record_pieces(key: rsa.RSAPrivateKey) -> list[str]:
    """The key's TXT record in strings of 255, as `check` prints it and zone files hold it."""
    record = txt_record(key)
    return [record[i : i + 255] for i in range(0, len(record), 255)]


def test_check_fails_when_the_dns_publishes_another_key(
    run_cli: CliRun,
    write_config: ConfigWriter,
    key_file: Path,
    rsa_1024: rsa.RSAPrivateKey,
    loopback_dns: LoopbackDns,
) -> None:
    """Another key at the selector: every signature would fail, so `check` stops with exit 1."""
    write_config(dkim=dkim_section())
    loopback_dns.publish(DNS_NAME, _record_pieces(rsa_1024))
    result = run_cli("check", "--no-smtp")
    assert result.exit_code == 1
    assert f"the DNS publishes another key at {DNS_NAME}" in result.output
    assert "[dkim] selector" in result.output
    assert "all checks passed" not in result.output


def test_check_fails_when_the_published_key_is_revoked(
    run_cli: CliRun, write_config: ConfigWriter, key_file: Path, loopback_dns: LoopbackDns
) -> None:
    """An empty p= is a revoked key (RFC 6376 3.6.1): `check` says so and fails."""
    write_config(dkim=dkim_section())
    loopback_dns.publish(DNS_NAME, ["v=DKIM1; k=rsa; p="])
    result = run_cli("check", "--no-smtp")
    assert result.exit_code == 1
    assert f"the DNS publishes a revoked key at {DNS_NAME}" in result.output


def test_check_warns_when_nothing_is_published_yet(
    run_cli: CliRun, write_config: ConfigWriter, key_file: Path, loopback_dns: LoopbackDns
) -> None:
    """No record yet (NXDOMAIN): a warning, not a failure, after the record to publish."""
    write_config(dkim=dkim_section())
    result = run_cli("check", "--no-smtp")
    assert result.exit_code == 0, result.output
    assert f"dkim: warning: nothing is published at {DNS_NAME} yet" in result.output
    assert "IN TXT" in result.output
    assert loopback_dns.asked == [DNS_NAME + "."]


def test_check_says_so_when_the_dns_cannot_be_asked(
    run_cli: CliRun, write_config: ConfigWriter, key_file: Path, loopback_dns: LoopbackDns
) -> None:
    """A DNS server that fails (SERVFAIL): `check` says it could not look, and how to look."""
    write_config(dkim=dkim_section())
    loopback_dns.failing = True
    result = run_cli("check", "--no-smtp")
    assert result.exit_code == 0, result.output
    assert f"dkim: could not ask the DNS for {DNS_NAME}" in result.output
    assert f"dig TXT {DNS_NAME}" in result.output


def test_check_finds_the_key_among_other_txt_records_and_spaces_in_p(
    run_cli: CliRun,
    write_config: ConfigWriter,
    key_file: Path,
    rsa_2048: rsa.RSAPrivateKey,
    loopback_dns: LoopbackDns,
) -> None:
    """Other TXT records at the name, and spaces inside p= (allowed), do not hide the key."""
    write_config(dkim=dkim_section())
    key = txt_record(rsa_2048).split("p=")[1]
    record = "v=DKIM1; k=rsa; p=" + " ".join(key[i : i + 64] for i in range(0, len(key), 64))
    loopback_dns.publish(DNS_NAME, ["google-site-verification=abc"])
    loopback_dns.publish(DNS_NAME, [record[:255], record[255:]])
    result = run_cli("check", "--no-smtp")
    assert result.exit_code == 0, result.output
    assert f"dkim: {DNS_NAME} publishes this key" in result.output


def test_check_takes_the_key_published_in_pkcs1_form_as_this_key(
    run_cli: CliRun,
    write_config: ConfigWriter,
    key_file: Path,
    rsa_2048: rsa.RSAPrivateKey,
    loopback_dns: LoopbackDns,
) -> None:
    """p= as a bare PKCS #1 RSAPublicKey, which verifiers accept, is the same key: ok."""
    write_config(dkim=dkim_section())
    der = rsa_2048.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )
    record = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    loopback_dns.publish(DNS_NAME, [record[i : i + 255] for i in range(0, len(record), 255)])
    result = run_cli("check", "--no-smtp")
    assert result.exit_code == 0, result.output
    assert f"dkim: {DNS_NAME} publishes this key" in result.output


def test_check_does_not_take_a_wildcards_dmarc_record_for_a_key(
    run_cli: CliRun, write_config: ConfigWriter, key_file: Path, loopback_dns: LoopbackDns
) -> None:
    """A TXT record whose v= is not DKIM1 (a wildcard's DMARC) is no key: nothing published."""
    write_config(dkim=dkim_section())
    loopback_dns.publish(DNS_NAME, ["v=DMARC1; p=none"])
    result = run_cli("check", "--no-smtp")
    assert result.exit_code == 0, result.output
    assert f"dkim: warning: nothing is published at {DNS_NAME} yet" in result.output


@pytest.mark.parametrize(("mode", "warns"), [(0o600, False), (0o640, True), (0o644, True)])
def test_check_warns_when_other_users_can_read_the_key_file(  # noqa: PLR0917  # pytest fixtures
    run_cli: CliRun,
    write_config: ConfigWriter,
    key_file: Path,
    loopback_dns: LoopbackDns,
    mode: int,
    warns: bool,
) -> None:
    """Whoever can read the key signs as the domain: a group- or world-readable file is named."""
    write_config(dkim=dkim_section())
    key_file.chmod(mode)
    result = run_cli("check", "--no-smtp")
    assert result.exit_code == 0, result.output
    warning = f"dkim: warning: {key_file} can be read by other users (mode {mode:03o})"
    assert (warning in result.output) is warns
    assert (f"chmod 600 {key_file}" in result.output) is warns


def test_check_says_dkim_is_off_without_a_dkim_section(
    run_cli: CliRun, loopback_dns: LoopbackDns
) -> None:
    """No [dkim]: `check` says signing is off, prints no DNS record and asks the DNS nothing."""
    result = run_cli("check", "--no-smtp")
    assert result.exit_code == 0, result.output
    assert "dkim: off" in result.stdout
    assert "_domainkey" not in result.stdout
    assert loopback_dns.asked == []


# -- the signing child -----------------------------------------------------------------------


def _signing_children() -> list[multiprocessing.process.BaseProcess]:
    return [p for p in multiprocessing.active_children() if p.name == "appeal-mailer-dkim"]


async def test_the_signing_process_makes_the_signers_signatures_in_order(signer: Signer) -> None:
    """Asked in several turns and batches, the child answers each with Signer.rsa's signature.

    PKCS #1 v1.5 is deterministic, so each must be byte for byte the in-line one.
    """
    signing = await SigningProcess.start(signer)
    assert signing is not None, "this OS can fork: the child must be used"
    try:
        (child,) = _signing_children()
        payloads = [f"message {i} to sign".encode() for i in range(100)]
        futures = [signing.rsa(data) for data in payloads[:40]]  # 40 in one turn: 3 batches
        await asyncio.sleep(0)
        futures += [signing.rsa(data) for data in payloads[40:]]
        signatures = await asyncio.gather(*futures)
        assert signatures == [signer.rsa(data) for data in payloads]
    finally:
        await signing.close()
    assert child.exitcode == 0
    assert _signing_children() == []


async def test_the_signing_child_keeps_none_of_the_runs_descriptors_open(
    signer: Signer, tmp_path: Path
) -> None:
    """Forked, the child closes what it inherited: only its socket and the standard streams.

    A copy of an SMTP session's socket kept the connection open at the server
    after the run had dropped it; a copy of the ledger's socket would keep the
    ledger's child from seeing the run die.
    """
    with socket.socket() as held, (tmp_path / "open.txt").open("w") as also_held:
        signing = await SigningProcess.start(signer)
        assert signing is not None
        try:
            (child,) = _signing_children()
            assert await signing.rsa(b"x") == signer.rsa(b"x")  # it has closed them by now
            fds = {int(fd) for fd in os.listdir(f"/proc/{child.pid}/fd")}
            assert held.fileno() not in fds
            assert also_held.fileno() not in fds
            assert len(fds - {0, 1, 2}) == 1, fds  # its socket to the run, nothing else
        finally:
            await signing.close()


async def test_closing_kills_a_signing_child_that_does_not_exit(
    signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that no longer reads (stopped) is killed, not waited for for ever.

    With more asked of it than the socket buffers hold: a close that waited
    for those to be written would never return.
    """
    monkeypatch.setattr(signing, "_EXIT_SECONDS", 0.2)
    process = await SigningProcess.start(signer)
    assert process is not None
    (child,) = _signing_children()
    assert child.pid is not None
    os.kill(child.pid, signal.SIGSTOP)
    asked = [process.rsa(bytes([i % 256]) * 2000) for i in range(400)]
    await asyncio.sleep(0.05)  # let the loop try to write them: they stay buffered
    await asyncio.wait_for(process.close(), DEADLINE)
    assert child.exitcode == -signal.SIGKILL
    for future in asked:
        with pytest.raises(AppealMailerError):
            await future


async def test_a_dead_signing_process_fails_what_is_asked_with_a_hint(signer: Signer) -> None:
    """Killed, the child fails every signature still asked, and all asked later, with a hint."""
    signing = await SigningProcess.start(signer)
    assert signing is not None
    try:
        (child,) = _signing_children()
        assert await signing.rsa(b"before") == signer.rsa(b"before")
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        for data in (b"while dying", b"after"):
            with pytest.raises(AppealMailerError) as excinfo:
                await signing.rsa(data)
            assert "the DKIM signing process ended unexpectedly" in str(excinfo.value)
            assert excinfo.value.hint is not None
            assert "run the same command again" in excinfo.value.hint
    finally:
        await signing.close()


def test_a_send_of_hundreds_of_messages_is_signed_by_the_child(  # noqa: PLR0917  # pytest fixtures
    run_cli: CliRun,
    write_config: ConfigWriter,
    key_file: Path,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    rsa_2048: rsa.RSAPrivateKey,
) -> None:
    """400 personal messages, 25 batches or more through the child: every one verifies, once."""
    write_config(dkim=dkim_section(), campaign={"template": "protest"})
    people = write_list(
        [
            {
                "email": f"member{i:04d}@example.org",
                "name": f"Жанна {i}",
                "organization": "Branch 7",
            }
            for i in range(400)
        ]
    )
    seen: list[list[str]] = []

    def on_data(received: Received) -> None:
        if not seen:  # the run is in this process: its child is this process's too
            seen.append([p.name for p in multiprocessing.active_children()])

    smtp_server.on_data = on_data
    _send_signed(run_cli, people, smtp_server, txt_record(rsa_2048))
    assert len(smtp_server.messages) == 400
    assert "appeal-mailer-dkim" in seen[0]


# -- the signing child killed under a real `send` ---------------------------------------------

# Received before the child is killed. The run holds at most about 220 messages
# rendered ahead (feed 128, signing ahead 64, claimed 3 x connections), so with
# 800 recipients the child is still needed when it dies.
KILL_AT = 20
LIST_SIZE = 800


def _children_of(pid: int) -> list[int]:
    """The child processes of `pid`, from each of its threads' /proc children lists."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _holds_open(pid: int, path: Path) -> bool:
    folder = Path(f"/proc/{pid}/fd")
    for fd in folder.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == str(path):
                return True
    return False


def signing_child(pid: int, ledger: Path) -> int:
    """The `appeal-mailer-dkim` child of the `send` whose pid is `pid`.

    multiprocessing names a process only inside Python, so it is told from the
    other child `send` forks, the ledger's (ledger_process.py), by what it has
    open: the ledger's child has the ledger's file open, the signing child not.
    """
    children = _children_of(pid)
    candidates = [child for child in children if not _holds_open(child, ledger)]
    assert len(children) == 2, children
    assert len(candidates) == 1, candidates
    return candidates[0]


def _gone(pid: int) -> bool:
    """True once `pid` has exited: no such process, or a zombie nobody reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


@pytest.fixture
def kill_setup(
    write_config: ConfigWriter, key_file: Path, write_list: ListWriter
) -> tuple[Path, Path]:
    """A [dkim] config and a list of LIST_SIZE; the config and the list."""
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("no /proc/PID/task/TID/children here: the signing child cannot be found")
    config = write_config(dkim=dkim_section())
    people = write_list(
        [{"email": f"member{i:04d}@example.org", "name": f"Member {i}"} for i in range(LIST_SIZE)]
    )
    return config, people


def start_send(
    config: Path, people: Path, children: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """`python -m appeal_mailer send LIST --yes` as a process of its own."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appeal_mailer",
            "--config",
            str(config),
            "send",
            str(people),
            "--yes",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=config.parent,
    )
    children.append(process)
    return process


def finish(process: subprocess.Popen[bytes]) -> tuple[int, str, str]:
    """Wait for a `send` to end: its exit status, stdout and stderr."""
    try:
        out, err = process.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate(timeout=30)
        pytest.fail(f"send did not end within {DEADLINE} s:\n{out.decode()}\n{err.decode()}")
    return process.returncode, out.decode(), err.decode()


def kill_signing_child_at(
    server: RecordingServer,
    ledger: Path,
    running: list[subprocess.Popen[bytes]],
    *,
    kill_send: bool = False,
) -> dict[str, Any]:
    """On the KILL_AT-th message received, SIGKILL the signing child of running[-1].

    Done on the server's thread before it replies, so the run is surely mid-way.
    With `kill_send`, the `send` itself is killed instead, its child left alone.
    What happened is in the returned dict: "child" (its pid), or "error".
    """
    done: dict[str, Any] = {}

    def on_data(received: Received) -> None:
        if done or len(server.messages) != KILL_AT - 1:
            return
        try:
            child = signing_child(running[-1].pid, ledger)
            done["child"] = child
            os.kill(running[-1].pid if kill_send else child, signal.SIGKILL)
        except Exception as exc:  # reported by the test, not the server
            done["error"] = repr(exc)

    server.on_data = on_data
    return done


def test_a_killed_signing_child_stops_the_run_and_the_next_send_finishes(
    kill_setup: tuple[Path, Path],
    smtp_server: RecordingServer,
    children: list[subprocess.Popen[bytes]],
    rsa_2048: rsa.RSAPrivateKey,
) -> None:
    """SIGKILL to appeal-mailer-dkim mid-run: exit 3 saying so, nothing `sending`, none twice.

    The messages not sent stay pending; a second `send` sends exactly those,
    and every message of both runs verifies.
    """
    config, people = kill_setup
    ledger = config.parent / "ledger.db"
    killed = kill_signing_child_at(smtp_server, ledger, children)
    status, out, err = finish(start_send(config, people, children))
    assert killed.get("error") is None, killed
    assert "child" in killed
    assert _gone(killed["child"])
    # Some messages were sent, then the run stopped: "finished, but ..." (cli.py).
    assert status == 3, out + err
    stopped = "Stopped early: could not prepare the next message: the DKIM signing process"
    assert f"{stopped} ended unexpectedly" in out
    assert "hint: run the same command again: the messages not sent are still due" in out
    first = len(smtp_server.messages)
    assert KILL_AT <= first < LIST_SIZE
    counts = ledger_counts(ledger)
    assert counts == {"sent": first, "pending": LIST_SIZE - first}
    assert set(smtp_server.count_by_recipient().values()) == {1}

    smtp_server.on_data = None
    status, out, err = finish(start_send(config, people, children))
    assert status == 0, out + err
    assert ledger_counts(ledger) == {"sent": LIST_SIZE}
    counts_by_recipient = smtp_server.count_by_recipient()
    assert len(counts_by_recipient) == LIST_SIZE
    assert set(counts_by_recipient.values()) == {1}
    messages = [m.data for m in smtp_server.messages]
    assert not_verified(messages, DNS_NAME, txt_record(rsa_2048)) == []


def test_a_killed_signing_child_is_reported_once_without_tracebacks(
    kill_setup: tuple[Path, Path],
    smtp_server: RecordingServer,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """The stop is said once, in the summary; stderr (what cron mails) carries no traceback."""
    config, people = kill_setup
    killed = kill_signing_child_at(smtp_server, config.parent / "ledger.db", children)
    status, out, err = finish(start_send(config, people, children))
    assert "child" in killed, killed
    assert status == 3, out + err
    assert (out + err).count("the DKIM signing process ended unexpectedly") == 1
    assert "Traceback" not in err
    assert "Future exception was never retrieved" not in err


def test_a_killed_send_takes_its_signing_child_with_it(
    kill_setup: tuple[Path, Path],
    smtp_server: RecordingServer,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """SIGKILL to `send` itself: its signing child (SIGTERM ignored) sees EOF and exits."""
    config, people = kill_setup
    killed = kill_signing_child_at(
        smtp_server, config.parent / "ledger.db", children, kill_send=True
    )
    status, _, _ = finish(start_send(config, people, children))
    assert status == -signal.SIGKILL
    assert "child" in killed, killed
    deadline = time.monotonic() + DEADLINE
    while not _gone(killed["child"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(killed["child"]), f"the signing child {killed['child']} outlived its send"
