"""Wire bytes from `MessageBuilder`, parsed back with Python's `email` package.

Every message is checked against the rules of RFC 5322 (CRLF, 998 octets,
folding, ASCII headers), RFC 2045/2046 (transfer encodings, multipart), RFC
2047 (encoded-words), RFC 2369/8058 (List-Unsubscribe) and RFC 2919 (List-Id),
and is then decoded to prove it says exactly what was rendered.
"""

# Cyrillic, Kazakh and CJK text is what these tests are about, so its look-alikes are meant:
# ruff: noqa: RUF001

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import urllib.parse
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from appeal_mailer.config import NAME_PATTERN, CampaignSettings
from appeal_mailer.mime import MessageBuilder, unsubscribe_token
from appeal_mailer.models import NAME_MAX, Recipient, RenderedMessage

DATE = datetime(2003, 6, 12, 9, 30, 15, tzinfo=UTC)
KEY = b"test-unsubscribe-key"
ADDRESS = "member@example.org"
SUBJECT = "Free the Karaganda three"
TEXT = "Please forward this appeal.\n"
RUSSIAN = (
    "Срочное обращение: три профсоюзных лидера в Караганде арестованы и оштрафованы.\n"
    "Пожалуйста, перешлите это письмо и направьте протест в суд.\n"
)
KAZAKH_NAME = "Ерлан Қасымұлы Әбдіқадыров"
CYRILLIC_NAME = "Жанна Тимофеевна Смирнова-Щукина"
CJK_NAME = "王小明（山田太郎）"
REQUIRED = (
    "Date",
    "From",
    "To",
    "Subject",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "List-Id",
    "List-Unsubscribe",
    "Precedence",
)
# RFC 5322 2.1.1: a line MUST be at most 998 octets and SHOULD be at most 78.
MAX_LINE = 998
FOLD_AT = 78
# RFC 2047 2: an encoded-word is at most 75 characters.
ENCODED_WORD_MAX = 75
ENCODED_WORD = re.compile(rb"=\?([^?\s]*)\?([^?\s]*)\?([^?\s]*)\?=")
# RFC 5322 3.2.3 and 3.6.4: msg-id = "<" dot-atom-text "@" dot-atom-text ">".
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
MSG_ID = re.compile(rf"<{_DOT_ATOM}@{_DOT_ATOM}>")
# RFC 2046 5.1.1: boundary := 0*69<bchars> bcharsnospace.
BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")

# -- building and parsing -------------------------------------------------------------


def make_campaign(**overrides: Any) -> CampaignSettings:
    """A valid campaign; a keyword set to None removes that key."""
    data: dict[str, Any] = {
        "id": "karaganda-2003",
        "from": "Solidarity Committee <appeal@example.org>",
        "list_id": "Solidarity <appeal.lists.example.org>",
        "unsubscribe_mailto": "unsubscribe@example.org",
    }
    data.update(overrides)
    return CampaignSettings.model_validate({k: v for k, v in data.items() if v is not None})


def token_campaign() -> CampaignSettings:
    return make_campaign(
        unsubscribe_url="https://lists.example.org/unsubscribe?e={email}&t={token}",
        unsubscribe_key=SecretStr(KEY.decode()),
    )


def rendered(
    *,
    name: str = "",
    email: str = ADDRESS,
    subject: str = SUBJECT,
    text: str = TEXT,
    html: str | None = None,
    step: str = "appeal",
) -> RenderedMessage:
    return RenderedMessage(
        recipient=Recipient(email=email, line=2, name=name),
        step=step,
        subject=subject,
        text=text,
        html=html,
    )


def build(
    message: RenderedMessage | None = None,
    *,
    campaign: CampaignSettings | None = None,
    builder: MessageBuilder | None = None,
    date: datetime = DATE,
) -> bytes:
    """The wire bytes of `message`, with the Message-ID the builder gives it."""
    message = message or rendered()
    builder = builder or MessageBuilder(campaign or make_campaign(), unsubscribe_key=KEY)
    message_id = builder.message_id(message.step, message.recipient.email)
    return builder.build(message, message_id=message_id, date=date)


def parse(raw: bytes) -> EmailMessage:
    return cast(EmailMessage, BytesParser(policy=policy.default).parsebytes(raw))


def header_block(raw: bytes) -> bytes:
    head, sep, _ = raw.partition(b"\r\n\r\n")
    assert sep, "no blank line ends the header section"
    return head


def canonical(text: str) -> bytes:
    """RFC 2046 4.1.1 canonical form of a text body: CR, LF and CRLF are each one CRLF break."""
    data = re.sub(r"\r\n|\r|\n", "\n", text)
    if not data.endswith("\n"):
        data += "\n"
    return data.replace("\n", "\r\n").encode("utf-8")


def normalized(text: str) -> str:
    """The text a reader sees: line breaks as \\n, a final newline ensured."""
    return canonical(text).decode("utf-8").replace("\r\n", "\n")


def field_value(raw: bytes, name: str) -> str:
    """The unfolded value of the one header field `name`, as it is on the wire."""
    found = re.findall(
        rb"^" + re.escape(name.encode()) + rb": ?(.*?)\r\n(?![ \t])",
        header_block(raw) + b"\r\n",
        re.M | re.S,
    )
    assert len(found) == 1, (name, found)
    return str(found[0].decode("ascii").replace("\r\n", ""))


def decode_phrase(phrase: str) -> str:
    """An RFC 5322 phrase (a display name) decoded as RFC 2047 6.2 says.

    Python's address parser keeps the white space between adjacent
    encoded-words (CPython gh-128110, fixed by python/cpython#130749) and
    collapses runs of spaces inside one, so a phrase of encoded-words is
    decoded with the older `email.header.decode_header`, which does neither;
    any other phrase goes through the address parser, which must find no
    defect in it.
    """
    if ENCODED_WORD.search(phrase.encode("ascii")):
        # The builder encodes a phrase whole or not at all.
        assert ENCODED_WORD.sub(b"", phrase.encode("ascii")).strip(b" ") == b"", phrase
        return str(make_header(decode_header(phrase)))
    probe = policy.default.header_factory("To", f"{phrase} <probe@example.org>")
    assert probe.defects == ()
    (address,) = probe.addresses  # type: ignore[attr-defined]
    return str(address.display_name)


def mailbox_of(raw: bytes, name: str) -> tuple[str, str]:
    """The display name and address of the one mailbox in header `name`."""
    msg = parse(raw)
    (address,) = msg[name].addresses
    value = field_value(raw, name)
    phrase = value.rpartition("<")[0].strip(" ") if value.endswith(">") else ""
    return decode_phrase(phrase), str(address.addr_spec)


def check_header_lines(head: bytes) -> None:
    """ASCII, no line over 998, folded at 78 wherever whitespace or an encoded-word allows."""
    assert head.isascii(), head
    for line in head.split(b"\r\n"):
        assert len(line) <= MAX_LINE, line[:100]
        # RFC 5322 3.2.2: a folded line has something besides white space.
        assert line.strip(b" \t"), head
        if len(line) > FOLD_AT:
            if line[:1] in b" \t":
                rest = line.lstrip(b" \t")
            else:
                rest = line.partition(b":")[2].lstrip(b" ")
            # Only one unsplittable token, an address, URL or msg-id in angle brackets,
            # may make a line this long: text can always be split into encoded-words.
            assert re.fullmatch(rb"<[^<>\s]+>,?", rest), line
    for match in ENCODED_WORD.finditer(head):
        word, charset, encoding, payload = match.group(0), *match.groups()
        assert len(word) <= ENCODED_WORD_MAX, word
        assert charset.lower() == b"utf-8", word
        if encoding.lower() == b"b":
            data = base64.b64decode(payload, validate=True)
        else:
            assert encoding.lower() == b"q", word
            data = binascii.a2b_qp(payload, header=True)
        # RFC 2047 5: each encoded-word holds whole characters.
        data.decode("utf-8")


def defects(msg: EmailMessage) -> list[object]:
    """Every defect Python's parser found, in the message, its parts, and their headers."""
    found: list[object] = []
    for part in msg.walk():
        found.extend(part.defects)
        for _, value in part.items():
            found.extend(getattr(value, "defects", ()))
    return found


def check_wire(raw: bytes) -> EmailMessage:
    """The RFC 5322/2045 checks every message must pass; returns the parsed message."""
    assert raw.endswith(b"\r\n")
    # Every header is ASCII and every body 7bit, quoted-printable or base64.
    assert raw.isascii()
    bare = raw.replace(b"\r\n", b"")
    assert b"\r" not in bare, "bare CR"
    assert b"\n" not in bare, "bare LF"
    assert max(len(line) for line in raw.split(b"\r\n")) <= MAX_LINE
    # RFC 5322 3.5: no NUL anywhere in a message.
    assert b"\0" not in raw
    check_header_lines(header_block(raw))
    msg = parse(raw)
    assert defects(msg) == []
    boundary = msg.get_boundary()
    if boundary is not None:
        for chunk in raw.split(f"--{boundary}\r\n".encode())[1:]:
            check_header_lines(header_block(chunk))
    for part in msg.walk():
        if not part.is_multipart():
            assert part["Content-Transfer-Encoding"] in {"7bit", "quoted-printable", "base64"}
    return msg


def part_body(part: EmailMessage) -> tuple[str, bytes]:
    """A single part's transfer encoding and decoded bytes."""
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return str(part["Content-Transfer-Encoding"]), payload


# -- strategies --------------------------------------------------------------------------

# What lists.py and render.py let reach a header: no C0/C1 controls, no line or
# paragraph separators, no lone surrogates.
_HEADER_SAFE = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"))
_TRICKY = [
    *"ЖжЩщЁёӘәҒғҚқҢңӨөҰұҮүҺһІі王小明山田太郎한국어😀🇰🇿é\u00a0\u3000",
    *"\"'\\,.;:<>()[]@=?_ ",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467",  # one emoji of three joined
    "=?",
    "?=",
    "=?utf-8?q?x?=",
    "=?utf-8?b?eA==?=",
    "  ",
]
_HEADER_PIECES = st.one_of(_HEADER_SAFE, st.sampled_from(_TRICKY))
_LONG_WORD = st.builds(
    lambda unit, count: unit * count,
    st.sampled_from(["a", "Ж", "字", "\\", '"', "=?", "😀", "a.", "ab "]),
    st.integers(min_value=20, max_value=1300),
)
# Names are stripped (and NFC-normalized) by lists.py; the builder must keep the rest.
names = st.one_of(
    st.lists(_HEADER_PIECES, max_size=60).map("".join),
    _LONG_WORD,
    st.tuples(st.text(_HEADER_SAFE, max_size=20), _LONG_WORD).map(" ".join),
).map(str.strip)
# Subjects are stripped and non-empty (render.py); mime must keep them exactly.
subjects = (
    st.one_of(
        st.lists(_HEADER_PIECES, min_size=1, max_size=120).map("".join),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=300),
        _LONG_WORD,
        st.tuples(st.text(_HEADER_SAFE, max_size=30), _LONG_WORD).map(" ".join),
    )
    .map(str.strip)
    .filter(bool)
)

_BODY_CHARS = st.characters(blacklist_categories=("Cs",))
_ASCII_CHARS = st.characters(max_codepoint=0x7F)
_LINE_STARTS = st.sampled_from(
    [".", "..", ". ", ".\t", "From ", "From here", ">From ", "--", "--=_am_", " ", "\t"]
)
_LINES = st.one_of(
    st.text(_BODY_CHARS, max_size=80),
    st.text(_ASCII_CHARS, max_size=80),
    st.text(st.characters(min_codepoint=0x400, max_codepoint=0x4FF), max_size=80),
    st.tuples(_LINE_STARTS, st.text(_BODY_CHARS, max_size=30)).map("".join),
    st.tuples(st.text(max_size=20), st.sampled_from([" ", "  ", "\t", " \t "])).map("".join),
    st.builds(
        lambda unit, count: unit * count,
        st.sampled_from(["a", "a ", " ", "ж", "字", "=", ".", "😀", "é"]),
        st.integers(min_value=900, max_value=2600),
    ),
)
_BREAKS = st.sampled_from(["\n", "\r\n", "\r", "\r\r\n", "\n\r", ""])
bodies = st.lists(st.tuples(_LINES, _BREAKS).map("".join), max_size=8).map("".join)

dates = st.datetimes(
    min_value=datetime(1970, 1, 1),  # naive bounds; the zone comes from `timezones`
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=6)), timezone(-timedelta(hours=5, minutes=30))]
    ),
)
# Names as config accepts them (NAME_PATTERN, at most NAME_MAX characters).
step_names = st.from_regex(r"\A[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+){0,3}\Z").filter(
    lambda name: len(name) <= NAME_MAX
)
addresses = st.emails(domains=st.sampled_from(["example.org", "mail.example.kz"]))

# Modest, so that the whole file runs in well under a minute.
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- structure and required headers --------------------------------------------------------


def test_plain_message_has_every_required_header_exactly_once() -> None:
    """A plain message carries each header of DESIGN.md's "Messages on the wire" exactly once."""
    msg = check_wire(build())
    for name in (*REQUIRED, "Content-Transfer-Encoding"):
        assert len(msg.get_all(name) or []) == 1, name
    assert msg["MIME-Version"] == "1.0"
    assert msg["Precedence"] == "bulk"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert msg["Reply-To"] is None
    assert msg["List-Unsubscribe-Post"] is None


def test_multipart_message_has_every_required_header_exactly_once() -> None:
    """A text+html message carries each required header once, and each part its own CTE."""
    msg = check_wire(build(rendered(html="<p>Please forward.</p>")))
    for name in REQUIRED:
        assert len(msg.get_all(name) or []) == 1, name
    assert len(msg.get_all("Content-Transfer-Encoding") or []) <= 1
    for part in msg.iter_parts():
        assert len(part.get_all("Content-Transfer-Encoding") or []) == 1
        assert len(part.get_all("Content-Type") or []) == 1


def test_reply_to_is_present_once_when_configured() -> None:
    """A configured reply_to becomes exactly one Reply-To header with its name and address."""
    campaign = make_campaign(reply_to="Кампания <replies@example.org>")
    raw = build(campaign=campaign)
    msg = check_wire(raw)
    assert len(msg.get_all("Reply-To") or []) == 1
    assert mailbox_of(raw, "Reply-To") == ("Кампания", "replies@example.org")


@given(date_list=st.lists(dates, min_size=1, max_size=4))
@example(date_list=[datetime(1970, 1, 1, tzinfo=UTC)])
@PROPERTY
def test_date_header_is_the_build_time_of_each_message(date_list: list[datetime]) -> None:
    """The Date header of every message one builder makes is that message's time, to the second."""
    builder = MessageBuilder(make_campaign(), unsubscribe_key=KEY)
    for date in date_list:
        msg = check_wire(build(builder=builder, date=date))
        assert len(msg.get_all("Date") or []) == 1
        assert msg["Date"].datetime == date.replace(microsecond=0)


# -- names, addresses and subjects ---------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        KAZAKH_NAME,
        CYRILLIC_NAME,
        CJK_NAME,
        "Анна 😀 Smith",
        "Smith, John",
        'John "Jack" O\'Neil \\ Jr.',
        "A. N. Other",
        "=?utf-8?q?Mallory?=",
        "Ann  Lee",
        "x" * 1200,
    ],
)
def test_to_display_name_and_address_round_trip(name: str) -> None:
    """A Kazakh, Cyrillic, CJK, quoted or RFC 2047 look-alike display name round-trips in To."""
    raw = build(rendered(name=name))
    check_wire(raw)
    assert mailbox_of(raw, "To") == (name, ADDRESS)


def test_kazakh_display_name_round_trips_through_rfc_2047() -> None:
    """A Kazakh display name goes on the wire as RFC 2047 encoded-words and decodes exactly."""
    raw = build(rendered(name=KAZAKH_NAME))
    to_field = re.search(rb"^To:.*?(?=\r\n[^ \t])", header_block(raw), re.M | re.S)
    assert to_field is not None
    assert ENCODED_WORD.search(to_field.group(0))
    assert mailbox_of(raw, "To") == (KAZAKH_NAME, ADDRESS)


def test_recipient_without_name_gets_a_bare_address() -> None:
    """An empty name puts only the address in To, with no empty phrase or quotes."""
    msg = check_wire(build(rendered(name="")))
    (address,) = msg["To"].addresses
    assert (address.display_name, address.addr_spec) == ("", ADDRESS)
    assert b"\r\nTo: member@example.org\r\n" in build(rendered(name=""))


@pytest.mark.parametrize(
    "subject",
    [
        "Срочно: три профсоюзных лидера в Караганде арестованы и оштрафованы судом",
        "Қарағанды: кәсіподақ жетекшілеріне арналған шұғыл өтініш",
        "卡拉干达工会领袖被捕：请转发",
        "Please forward: =?utf-8?q?not-encoded?= is plain text",
        "A long word: " + "Solidarity" * 12,
        "Short ASCII subject",
        "Two  spaces and a trailing comma,",
    ],
)
def test_subject_round_trips(subject: str) -> None:
    """A Cyrillic, Kazakh, CJK, look-alike or long-word Subject decodes back exactly."""
    msg = check_wire(build(rendered(subject=subject)))
    assert msg["Subject"] == subject


@given(name=names, email=addresses)
@example(name="=?utf-8?q?abc?=", email=ADDRESS)
@example(name="a  b", email=ADDRESS)
@example(name="a" * 1200, email=ADDRESS)
@example(name='"' * 40, email=ADDRESS)
@example(name="\\" * 70, email=ADDRESS)
@PROPERTY
def test_any_display_name_round_trips_in_to(name: str, email: str) -> None:
    """Any header-safe display name and address come back from the To header exactly."""
    raw = build(rendered(name=name, email=email))
    check_wire(raw)
    assert mailbox_of(raw, "To") == (name, email)


@given(subject=subjects)
@example(subject="Ж" * 40)
@example(subject="Срочно: три профсоюзных лидера")
@example(subject="x" * 70)
@PROPERTY
def test_any_subject_round_trips(subject: str) -> None:
    """Any stripped, control-free Subject comes back from the parser exactly."""
    msg = check_wire(build(rendered(subject=subject)))
    assert msg["Subject"] == subject


@given(name=names)
@example(name=KAZAKH_NAME)
@example(name="Solidarity, 2003")
@settings(max_examples=60, deadline=None)
def test_any_sender_and_list_name_round_trip(name: str) -> None:
    """The From display name and the List-Id phrase decode back to the configured names."""
    try:
        campaign = make_campaign(
            **{"from": f"{name} <appeal@example.org>", "list_id": f"{name} <x.lists.example.org>"}
        )
    except ValueError:
        assume(False)
        return
    raw = build(campaign=campaign)
    check_wire(raw)
    assert mailbox_of(raw, "From") == campaign.sender
    list_name, list_id = campaign.list_id_parts
    phrase, _, bracketed = field_value(raw, "List-Id").rpartition(" ")
    assert bracketed == f"<{list_id}>"
    # RFC 2919 2: the List-Id description is an RFC 5322 phrase.
    assert decode_phrase(phrase) == list_name


# -- bodies and transfer encodings -------------------------------------------------------


@given(text=bodies)
@example(text="")
@example(text="Привет мир\nвторая строка")
@example(text="a\nb\x00c")
@example(text="a\r\nb\rc\n\n")
@example(text=".\n..\nFrom here\n" + "x" * 2000 + "\ntrailing   \n")
@PROPERTY
def test_text_body_decodes_to_the_rendered_text(text: str) -> None:
    """Any text body decodes to its canonical form: CRLF line breaks, a final newline."""
    raw = build(rendered(text=text))
    msg = check_wire(raw)
    cte, payload = part_body(msg)
    assert payload == canonical(text), cte
    assert msg.get_content().replace("\r\n", "\n") == normalized(text)


@given(text=bodies, html=bodies)
@example(text="Please forward.", html="<p>Please forward.</p>")
@example(text="Привет", html="<p>--=_am_ not a boundary</p>")
@PROPERTY
def test_text_and_html_parts_decode_exactly_in_order(text: str, html: str) -> None:
    """With html, the message is multipart/alternative: text/plain then text/html, both exact."""
    raw = build(rendered(text=text, html=html))
    msg = check_wire(raw)
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    for part, source in zip(parts, (text, html), strict=True):
        assert part.get_content_charset() == "utf-8"
        _, payload = part_body(cast(EmailMessage, part))
        assert payload == canonical(source)
    boundary = msg.get_boundary()
    assert boundary is not None
    assert BOUNDARY.fullmatch(boundary)
    # RFC 2046 5.1.1: the boundary occurs only as the two delimiters and the close.
    assert raw.count(b"--" + boundary.encode()) == 3
    assert raw.endswith(f"\r\n--{boundary}--\r\n".encode())


def test_short_ascii_text_is_sent_as_7bit() -> None:
    """Short plain ASCII text goes as 7bit, byte for byte."""
    raw = build(rendered(text="Please forward.\n.\nFrom the committee\n"))
    msg = check_wire(raw)
    assert msg["Content-Transfer-Encoding"] == "7bit"
    # Not dot-stuffed and not ">From"-quoted: that is the transport's (or mbox's) business.
    assert raw.endswith(b"\r\n\r\nPlease forward.\r\n.\r\nFrom the committee\r\n")


def test_mostly_ascii_text_with_some_non_ascii_is_quoted_printable() -> None:
    """English text naming Караганда goes as quoted-printable and decodes exactly."""
    text = (
        "Three union leaders in Karaganda (Караганда) were jailed and fined.\n"
        "Please fax the court during its working hours and forward this appeal.\n"
    )
    raw = build(rendered(text=text))
    msg = check_wire(raw)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert part_body(msg)[1] == canonical(text)


def test_russian_text_is_base64() -> None:
    """A Russian body goes as base64 (shorter than quoted-printable) and decodes exactly."""
    raw = build(rendered(text=RUSSIAN))
    msg = check_wire(raw)
    assert msg["Content-Transfer-Encoding"] == "base64"
    assert part_body(msg)[1] == canonical(RUSSIAN)
    assert msg.get_content().replace("\r\n", "\n") == RUSSIAN


def test_ascii_line_over_998_octets_is_not_sent_as_7bit() -> None:
    """An ASCII line longer than 998 octets is encoded, so that no wire line is too long."""
    text = "x" * 999 + "\n"
    raw = build(rendered(text=text))
    msg = check_wire(raw)
    assert msg["Content-Transfer-Encoding"] != "7bit"
    assert part_body(msg)[1] == canonical(text)


def test_ascii_line_of_exactly_998_octets_stays_7bit() -> None:
    """An ASCII line of exactly 998 octets is within RFC 5322 2.1.1 and needs no encoding."""
    text = "x" * 998 + "\n"
    raw = build(rendered(text=text))
    msg = check_wire(raw)
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert part_body(msg)[1] == canonical(text)


def test_multipart_parts_are_never_7bit() -> None:
    """Parts of a multipart message are always encoded, so the boundary cannot occur in them."""
    msg = check_wire(build(rendered(text="--=_am_x\n", html="<p>ok</p>")))
    encodings = [p["Content-Transfer-Encoding"] for p in msg.iter_parts()]
    assert set(encodings) <= {"quoted-printable", "base64"}


# -- Message-ID -----------------------------------------------------------------------------


@pytest.mark.parametrize("email", ["anna.petrova@example.org", "abc@example.org"])
def test_message_id_does_not_disclose_the_address(email: str) -> None:
    """Neither the address nor its mailbox name appears in the Message-ID of a forwarded copy."""
    msg_id = MessageBuilder(make_campaign()).message_id("appeal", email)
    assert email.partition("@")[0] not in msg_id
    assert MSG_ID.fullmatch(msg_id)


def test_message_id_header_is_the_builders_id() -> None:
    """The Message-ID header is the one message_id() gives, a valid <left@right> msg-id."""
    builder = MessageBuilder(make_campaign(), unsubscribe_key=KEY)
    msg = check_wire(build(builder=builder))
    expected = builder.message_id("appeal", ADDRESS)
    assert msg["Message-ID"] == expected
    assert MSG_ID.fullmatch(expected)
    assert expected.endswith("@example.org>")


@given(
    campaign_id=step_names,
    step=step_names,
    email=addresses,
    other=st.tuples(step_names, step_names, addresses),
)
@settings(max_examples=60, deadline=None)
def test_message_id_is_deterministic_private_valid_and_distinct(
    campaign_id: str, step: str, email: str, other: tuple[str, str, str]
) -> None:
    """The Message-ID is the same on every build, hides the address, and differs per triple."""
    assert re.fullmatch(NAME_PATTERN, campaign_id)
    first = MessageBuilder(make_campaign(id=campaign_id)).message_id(step, email)
    again = MessageBuilder(make_campaign(id=campaign_id)).message_id(step, email)
    assert first == again
    assert MSG_ID.fullmatch(first), first
    if re.search(r"[^0-9a-f]", email.partition("@")[0]):
        # (A local part of hex digits could end the hex digest by chance.)
        assert email not in first
    other_campaign, other_step, other_email = other
    for changed in (
        (other_campaign, step, email),
        (campaign_id, other_step, email),
        (campaign_id, step, other_email),
    ):
        if changed != (campaign_id, step, email):
            builder = MessageBuilder(make_campaign(id=changed[0]))
            assert builder.message_id(changed[1], changed[2]) != first


@pytest.mark.parametrize("campaign_id", ["appeal..2003", "appeal."])
def test_campaign_id_that_is_not_dot_atom_is_refused_or_yields_valid_message_id(
    campaign_id: str,
) -> None:
    """A campaign id with '..' or a trailing '.' never produces an invalid Message-ID."""
    try:
        campaign = make_campaign(id=campaign_id)
    except ValueError:
        return
    assert MSG_ID.fullmatch(MessageBuilder(campaign).message_id("appeal", ADDRESS))


# -- List-Unsubscribe -----------------------------------------------------------------------


def list_unsubscribe_urls(msg: EmailMessage) -> list[str]:
    value = str(msg["List-Unsubscribe"])
    urls = re.findall(r"<([^<>]*)>", value)
    # RFC 2369 2: a comma-separated list of angle-bracketed URLs and nothing else.
    assert value == ", ".join(f"<{u}>" for u in urls)
    return urls


def test_mailto_only_list_unsubscribe_has_no_one_click_post() -> None:
    """With only a mailto, List-Unsubscribe names it and List-Unsubscribe-Post is absent."""
    msg = check_wire(build())
    assert list_unsubscribe_urls(msg) == [
        "mailto:unsubscribe@example.org?subject=unsubscribe%20karaganda-2003"
    ]
    assert msg["List-Unsubscribe-Post"] is None


def test_https_url_adds_one_click_post_and_comes_first() -> None:
    """An https URL comes first in List-Unsubscribe and adds RFC 8058 one-click exactly once."""
    msg = check_wire(build(campaign=token_campaign()))
    urls = list_unsubscribe_urls(msg)
    assert len(urls) == 2
    assert urls[0].startswith("https://lists.example.org/unsubscribe?")
    assert urls[1].startswith("mailto:unsubscribe@example.org")
    assert msg.get_all("List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]


def test_http_url_gets_no_one_click_post() -> None:
    """A plain http URL is listed but gets no List-Unsubscribe-Post (RFC 8058 3.1 needs https)."""
    campaign = make_campaign(unsubscribe_url="http://lists.example.org/u", unsubscribe_mailto=None)
    msg = check_wire(build(campaign=campaign))
    assert list_unsubscribe_urls(msg) == ["http://lists.example.org/u"]
    assert msg["List-Unsubscribe-Post"] is None


@given(email=addresses)
@example(email="o'brien+appeal@example.org")
@PROPERTY
def test_unsubscribe_token_is_the_hmac_of_the_address(email: str) -> None:
    """The {token} in the https URL is the HMAC-SHA256 of the address, {email} its quoted form."""
    msg = check_wire(build(rendered(email=email), campaign=token_campaign()))
    url = list_unsubscribe_urls(msg)[0]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query, strict_parsing=True)
    assert query["e"] == [email]
    digest = hmac.new(KEY, email.encode(), hashlib.sha256).digest()
    token = query["t"][0]
    assert base64.urlsafe_b64decode(token) == digest[: len(base64.urlsafe_b64decode(token))]
    assert len(base64.urlsafe_b64decode(token)) >= 16
    assert token == unsubscribe_token(KEY, email)
    assert unsubscribe_token(KEY, email) != unsubscribe_token(KEY, "x" + email)
    assert unsubscribe_token(KEY, email) != unsubscribe_token(KEY + b"!", email)


# -- known problems outside mime.py ---------------------------------------------------------


def test_sender_with_internationalized_domain_gives_ascii_headers() -> None:
    """A From address with an internationalized domain goes on the wire in its ASCII form."""
    campaign = make_campaign(**{"from": "Комитет <appeal@пример.рф>"})
    msg = check_wire(build(campaign=campaign))
    assert msg["From"].addresses[0].domain == "xn--e1afmkfd.xn--p1ai"


def test_unsubscribe_mailto_with_a_name_is_refused_naming_the_bare_address() -> None:
    """An unsubscribe_mailto written as "Name <address>" is refused: a URL needs the address."""
    with pytest.raises(ValidationError, match=r"bare address such as 'unsubscribe@example\.org'"):
        make_campaign(unsubscribe_mailto="Unsubscribe <unsubscribe@example.org>")
