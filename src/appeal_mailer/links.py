"""`mailto:` links for templates (RFC 6068): one click opens a ready letter, addressed.

Written here because no well-kept library builds mailto URIs; the encoding
itself is the standard library's (`urllib.parse.quote`, UTF-8).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote

from markupsafe import Markup


def mailto(
    to: str | Iterable[str],
    *,
    subject: str | None = None,
    body: str | None = None,
    cc: str | Iterable[str] | None = None,
) -> str:
    """A `mailto:` URI that opens a message to `to`, with its subject, body and Cc filled in.

    RFC 6068: every character of a header value that is not "unreserved" is
    percent-encoded as UTF-8 (section 2), so "&", "=", "?", "#", "%" and "+"
    cannot break the URI or be read as a space (6.2); line breaks in the body
    become %0D%0A (section 5). Addresses are joined by "," and keep their "@".
    """
    # Text captured in an HTML template ({% set letter %}) arrives HTML-escaped: the
    # link must carry the letter's own characters ("&", not "&amp;").
    subject, body = _plain(subject), _plain(body)
    uri = "mailto:" + ",".join(_address(address) for address in _addresses(to))
    fields = []
    if cc:
        fields.append("cc=" + ",".join(_address(address) for address in _addresses(cc)))
    if subject:
        fields.append("subject=" + quote(subject, safe=""))
    if body:
        lines = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        fields.append("body=" + quote("\r\n".join(lines), safe=""))
    return uri + ("?" + "&".join(fields) if fields else "")


def _plain(text: str | None) -> str | None:
    return text.unescape() if isinstance(text, Markup) else text


def _addresses(value: str | Iterable[str]) -> list[str]:
    """ "a@x, b@y" or ["a@x", "b@y"]: the bare addresses (RFC 6068 2: addr-spec only)."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    addresses = [part.strip() for part in parts if part.strip()]
    for address in addresses:
        if "<" in address or ">" in address or " " in address or "@" not in address:
            raise ValueError(
                f"mailto() takes bare addresses such as court@example.org, not {address!r}"
            )
    return addresses


def _address(address: str) -> str:
    # Only the last "@" separates; one inside a quoted local part is encoded (RFC 6068 6.2).
    local, _, domain = address.rpartition("@")
    return quote(local, safe="") + "@" + quote(domain, safe="")
