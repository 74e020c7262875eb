"""DKIM-sign a message's wire bytes (RFC 6376): rsa-sha256, relaxed/relaxed, the key loaded once.

Written here rather than taken from dkimpy, the library for DKIM in Python:
dkimpy parses the whole message in Python and does RSA in pure Python, 6.5 ms
a signature on the 2-core benchmark machine, so it alone would cap a send at
about 150 messages/s. Here the message is ours (mime.py writes it: CRLF lines,
each header once), so canonicalizing it is a few byte operations, and the RSA
signature is OpenSSL's through `cryptography` (0.29 ms, and it releases the
GIL). The tests verify what this signs with dkimpy, an implementation of its
own, over generated names, subjects and bodies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from appeal_mailer.config import DkimSettings
from appeal_mailer.errors import ConfigError

# RFC 8301 3.2: signers MUST use RSA keys of at least 1024 bits, SHOULD use 2048.
MIN_BITS = 1024
_NOT_RSA = "the DKIM key is not an RSA key: appeal-mailer signs with rsa-sha256"
_MAKE_ONE = "make one with: openssl genrsa -out dkim.pem 2048"
# The runs of WSP that relaxed canonicalization changes: single spaces, most of
# a text's, stay as they are.
_WSP_TO_SPACE = re.compile(rb"\t[ \t]*| [ \t]+")
# Where one header field ends: a CRLF not followed by folding whitespace (RFC 5322 2.2.3).
_FIELD_END = re.compile(rb"\r\n(?![ \t])")
_FOLD_AT = 78
# Signed absent too, so that nobody can add one to a copy of the message (a
# Reply-To that sends the replies elsewhere): RFC 6376 8.15.
_ALSO_SIGNED = (b"reply-to", b"cc", b"sender", b"in-reply-to", b"references")


class Signer:
    """Signs each message of a campaign as `d=domain`, `s=selector`."""

    def __init__(
        self,
        key: rsa.RSAPrivateKey,
        domain: str,
        selector: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self.domain = domain
        self.selector = selector
        self._clock = clock
        self._padding = padding.PKCS1v15()
        self._hash = hashes.SHA256()
        self._head = [
            (" ", "v=1;"),
            (" ", "a=rsa-sha256;"),
            (" ", "c=relaxed/relaxed;"),
            (" ", f"d={domain};"),
            (" ", f"s={selector};"),
        ]

    @classmethod
    def from_settings(cls, dkim: DkimSettings, config: Path) -> Signer | None:
        """The signer [dkim] asks for, or None when it is off; ConfigError for a bad key."""
        if dkim.domain is None or dkim.selector is None:
            return None
        if dkim.private_key is not None:
            pem = dkim.private_key.get_secret_value().encode()
            where, key_name = config, "[dkim] private_key"
        elif dkim.private_key_file is None:  # DkimSettings refuses this; mypy cannot know
            raise ConfigError("no DKIM key", path=config, key="[dkim] private_key_file")
        else:
            where, key_name = dkim.private_key_file, None
            try:
                pem = dkim.private_key_file.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the DKIM key: {exc.strerror}",
                    path=config,
                    key="[dkim] private_key_file",
                    hint=f"check that {dkim.private_key_file} exists and this user may read it",
                ) from exc
        return cls(load_key(pem, where, key_name), dkim.domain, dkim.selector)

    @property
    def bits(self) -> int:
        return self._key.key_size

    @property
    def public_key(self) -> str:
        """The public key as a DKIM record's p= holds it: base64 of DER SubjectPublicKeyInfo."""
        public = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(public).decode("ascii")

    def dns_record(self) -> tuple[str, str]:
        """The DNS name of the public key, and the TXT record to put there (RFC 6376 3.6.1)."""
        name = f"{self.selector}._domainkey.{self.domain}"
        return name, f"v=DKIM1; k=rsa; p={self.public_key}"

    def published(self, *, timeout: float = 3.0) -> tuple[list[str], str | None]:
        """The p= values published at the key's DNS name, and why the lookup failed, if it did.

        ([], None): the DNS says there is no record. A p= that is empty means a
        revoked key (RFC 6376 3.6.1).
        """
        # Imported here: only `check` asks the DNS (dnspython, email-validator's too).
        import dns.exception  # noqa: PLC0415
        import dns.resolver  # noqa: PLC0415

        name, _ = self.dns_record()
        try:
            answer = dns.resolver.resolve(name, "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [], None
        except dns.exception.DNSException as exc:
            return [], str(exc) or exc.__class__.__name__
        keys = []
        for record in answer:
            # RFC 6376 3.6.2.2: a record's strings are joined without spaces.
            text = b"".join(record.strings).decode("ascii", "replace")
            tags = {
                key.strip(): value.strip()
                for key, _, value in (t.partition("=") for t in text.split(";"))
            }
            # RFC 6376 3.6.1: v=, if there, is DKIM1; other TXT records (SPF, a
            # wildcard's DMARC record) are not keys.
            if "p" in tags and tags.get("v", "DKIM1") == "DKIM1":
                keys.append("".join(tags["p"].split()))
        return keys, None

    def is_mine(self, published: str) -> bool:
        """Whether a record's p= is this key's public half, in whichever DER form it is.

        Compared as numbers, not as text: RFC 6376 3.6.1's wording also admits
        a bare PKCS #1 RSAPublicKey, which verifiers accept (dkimpy does).
        """
        try:
            key = serialization.load_der_public_key(base64.b64decode(published, validate=True))
        except (ValueError, UnsupportedAlgorithm, binascii.Error):
            return False
        return (
            isinstance(key, rsa.RSAPublicKey)
            and key.public_numbers() == self._key.public_key().public_numbers()
        )

    def sign(self, message: bytes) -> bytes:
        """`message` with a DKIM-Signature field on top.

        `message` is mime.py's: CRLF line endings, a header, an empty line, a
        body; not dot-stuffed (the transport does that, after signing, and the
        receiver undoes it before verifying).
        """
        unsigned = self.prepare(message)
        return unsigned.finish(self.rsa(unsigned.signed))

    def prepare(self, message: bytes) -> Unsigned:
        """Everything but the RSA signature: `rsa(...signed)`, then `finish`.

        In two halves so that a run can have the RSA part done by another
        process (signing.py) while it prepares the next messages.
        """
        end = message.find(b"\r\n\r\n")
        head, body = message[: end + 2], message[end + 4 :]
        fields = _FIELD_END.split(head[:-2])
        names = [field.partition(b":")[0].strip().lower() for field in fields]
        # Every field is signed, and each name is listed once more than it occurs
        # (then the _ALSO_SIGNED ones the message lacks): the extra entries sign "no
        # such field", so nobody can add a second From, Subject or List-Unsubscribe,
        # or a Reply-To, without breaking the signature (RFC 6376 5.4.2 and 8.15).
        # mime.py writes each field once.
        hashed = b"".join(map(_relaxed_field, fields))
        absent = [name for name in _ALSO_SIGNED if name not in names]
        listed = [name.decode("ascii") + ":" for name in names + names + absent]
        listed[0], listed[-1] = "h=" + listed[0], listed[-1][:-1] + ";"
        body_hash = base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest())
        tags = _fold(
            [
                *self._head,
                (" ", f"t={int(self._clock())};"),
                # RFC 6376 3.5: h= may fold after any colon; its names are not spaced.
                (" ", listed[0]),
                *(("", name) for name in listed[1:]),
                (" ", f"bh={body_hash.decode('ascii')};"),
                (" ", "b="),
            ]
        ).encode("ascii")
        # RFC 6376 3.7: the signature covers the header fields, then this field
        # itself with b= empty, canonicalized, without its final CRLF.
        return Unsigned(message, tags, hashed + _relaxed_field(tags)[:-2])

    def rsa(self, signed: bytes) -> bytes:
        """The RSA signature of `signed` (PKCS #1 v1.5, SHA-256): OpenSSL's, without the GIL."""
        return self._key.sign(signed, self._padding, self._hash)


@dataclass(frozen=True, slots=True)
class Unsigned:
    """A message prepared for signing: what the RSA signature is over, and how to finish."""

    message: bytes
    tags: bytes
    signed: bytes

    def finish(self, signature: bytes) -> bytes:
        encoded = base64.b64encode(signature)
        # Folding whitespace inside b= is ignored by verifiers (RFC 6376 3.5): the
        # rest of b='s line, then lines of a space and 77 characters.
        first = _FOLD_AT - (len(self.tags) - self.tags.rfind(b"\n") - 1)
        pieces = [encoded[:first]] if first > 0 else [b""]
        pieces += [encoded[i : i + _FOLD_AT - 1] for i in range(first, len(encoded), _FOLD_AT - 1)]
        return self.tags + b"\r\n ".join(pieces) + b"\r\n" + self.message


def load_key(pem: bytes, where: Path, key: str | None) -> rsa.RSAPrivateKey:
    """An RSA private key from PEM, or a ConfigError that says what is wrong with it."""

    def error(message: str, hint: str) -> ConfigError:
        return ConfigError(message, path=where, key=key, hint=hint)

    try:
        loaded = serialization.load_pem_private_key(pem, password=None)
    except TypeError as exc:  # encrypted: cron cannot type a passphrase
        raise error(
            "the DKIM key is protected by a passphrase",
            "store it without one, readable only by this user: openssl rsa -in KEY -out dkim.pem",
        ) from exc
    except UnsupportedAlgorithm as exc:  # a kind of key OpenSSL cannot load (SM2, odd curves)
        raise error(_NOT_RSA, _MAKE_ONE) from exc
    except (ValueError, UnicodeError) as exc:
        raise error("not a PEM private key", _MAKE_ONE) from exc
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise error(_NOT_RSA, _MAKE_ONE)
    if loaded.key_size < MIN_BITS:
        raise error(
            f"the DKIM key has {loaded.key_size} bits: RFC 8301 requires at least {MIN_BITS}",
            "make a 2048-bit one with: openssl genrsa -out dkim.pem 2048",
        )
    return loaded


def _relaxed_field(field: bytes) -> bytes:
    # RFC 6376 3.4.2: name in lower case; unfolded; runs of WSP as one SP; no WSP
    # at the end of the value or around the colon.
    name, _, value = field.partition(b":")
    value = _WSP_TO_SPACE.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


def _relaxed_body(body: bytes) -> bytes:
    # RFC 6376 3.4.4: runs of WSP as one SP, none at the end of a line, no empty
    # lines at the end, and a final CRLF unless the body is empty. mime.py writes
    # no bare CR or LF, so stripping trailing SP, CR and LF drops exactly the
    # trailing whitespace and empty lines.
    # Looking for the runs first is a fast search in C; most bodies (base64,
    # quoted-printable) have none, and the regex would scan them for nothing.
    if b"\t" in body or b"  " in body:
        body = _WSP_TO_SPACE.sub(b" ", body)
    body = body.replace(b" \r\n", b"\r\n").rstrip(b" \r\n")
    return body + b"\r\n" if body else b""


def _fold(tokens: list[tuple[str, str]]) -> str:
    """The DKIM-Signature field up to its b=, folded to lines of at most 78 characters.

    Each token goes on the line so far, after its separator, if it fits; else
    it starts the next line (RFC 5322 2.2.3: a CRLF and a space). A token too
    long for any line (a domain of 70 characters) has one of its own: its line
    is at most 998 octets, as the domain is at most 253.
    """
    lines: list[str] = []
    line = "DKIM-Signature:"
    for separator, token in tokens:
        if len(line) + len(separator) + len(token) <= _FOLD_AT:
            line += separator + token
        else:
            lines.append(line)
            line = " " + token
    lines.append(line)
    return "\r\n".join(lines)
