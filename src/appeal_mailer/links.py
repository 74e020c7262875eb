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
    uri = "mailto:" + ",".join(quote(address, safe="@") for address in _addresses(to))
    fields = []
    if cc:
        fields.append("cc=" + ",".join(quote(a, safe="@") for a in _addresses(cc)))
    if subject:
        fields.append("subject=" + quote(subject, safe=""))
    if body:
        lines = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        fields.append("body=" + quote("\r\n".join(lines), safe=""))
    return uri + ("?" + "&".join(fields) if fields else "")


def _plain(text: str | None) -> str | None:
    return text.unescape() if isinstance(text, Markup) else text


def _addresses(value: str | Iterable[str]) -> list[str]:
    return [value.strip()] if isinstance(value, str) else [a.strip() for a in value]
