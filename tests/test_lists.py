"""The subscriber list reader: decoding, header, row checks, normalization, dedup, streaming."""

from __future__ import annotations

import csv
import functools
import string
import subprocess
import sys
import tracemalloc
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appeal_mailer import lists
from appeal_mailer.errors import ListError
from appeal_mailer.lists import _CONTROL, normalize_address, read_recipients
from appeal_mailer.models import Recipient, SkippedRow

HEADER = "email,name,organization,language,timezone\n"


def write_bytes(tmp_path: Path, data: bytes, name: str = "list.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def write_text(tmp_path: Path, text: str, name: str = "list.csv") -> Path:
    return write_bytes(tmp_path, text.encode("utf-8"), name)


def read_all(path: Path) -> list[Recipient | SkippedRow]:
    return list(read_recipients(path))


def recipients(items: list[Recipient | SkippedRow]) -> list[Recipient]:
    return [item for item in items if isinstance(item, Recipient)]


def skipped(items: list[Recipient | SkippedRow]) -> list[SkippedRow]:
    return [item for item in items if isinstance(item, SkippedRow)]


def only_skipped(path: Path) -> SkippedRow:
    items = read_all(path)
    assert len(items) == 1, items
    item = items[0]
    assert isinstance(item, SkippedRow), item
    return item


# -- encoding ------------------------------------------------------------------------


def test_utf8_list_without_bom_is_read(tmp_path: Path) -> None:
    """A plain UTF-8 list is read, non-ASCII names intact."""
    path = write_text(tmp_path, HEADER + "a@example.org,Айгерім Сейітқали,Union,kk,Asia/Almaty\n")
    [item] = read_all(path)
    assert isinstance(item, Recipient)
    assert item.email == "a@example.org"
    assert item.name == "Айгерім Сейітқали"
    assert item.line == 2


def test_utf8_list_with_bom_is_read_and_the_bom_does_not_reach_the_header(
    tmp_path: Path,
) -> None:
    """A UTF-8 BOM (as spreadsheets write it) is dropped: the first column is still `email`."""
    path = write_bytes(
        tmp_path, b"\xef\xbb\xbf" + "email,name\nb@example.org,Jürgen Weiß\n".encode()
    )
    [item] = read_all(path)
    assert isinstance(item, Recipient)
    assert item.email == "b@example.org"
    assert item.name == "Jürgen Weiß"
    assert "\ufeffemail" not in item.fields


def test_undecodable_byte_is_reported_with_its_line_number_after_earlier_rows(
    tmp_path: Path,
) -> None:
    """An undecodable byte raises ListError naming its line; rows before it were yielded first."""
    data = (HEADER + "one@example.org,One,,,\ntwo@example.org,Two,,,\n").encode() + (
        b"three@example.org,Caf\xe9,,,\nfour@example.org,Four,,,\n"
    )
    path = write_bytes(tmp_path, data)
    stream = read_recipients(path)
    seen = [next(stream), next(stream)]
    assert [item.email for item in recipients(seen)] == ["one@example.org", "two@example.org"]
    with pytest.raises(ListError) as excinfo:
        next(stream)
    error = excinfo.value
    assert error.line == 4
    assert error.path == path
    assert "0xe9" in str(error)
    assert f"{path}:4" in str(error)


def test_broken_csv_with_unbalanced_quote_is_reported_with_a_line(tmp_path: Path) -> None:
    """A quote left open mid-field makes the file unreadable: ListError names the row's line."""
    path = write_text(
        tmp_path,
        HEADER
        + "ok@example.org,Ok,,,\n"
        + 'bad@example.org,"Unclosed ,,,\nlast@example.org,x,,,\n',
    )
    with pytest.raises(ListError) as excinfo:
        read_all(path)
    assert excinfo.value.line == 3
    assert "broken CSV" in str(excinfo.value)
    assert excinfo.value.hint is not None


def test_stray_quote_inside_an_unquoted_field_is_reported_with_a_line(tmp_path: Path) -> None:
    """A quote in the middle of an unquoted field is a CSV error naming its line (strict mode)."""
    path = write_text(tmp_path, HEADER + 'ok@example.org,Ok,,,\nx@example.org,"A"B,,,\n')
    with pytest.raises(ListError) as excinfo:
        read_all(path)
    assert excinfo.value.line == 3


# -- the header ----------------------------------------------------------------------


def test_empty_file_is_refused_as_having_no_header(tmp_path: Path) -> None:
    """An empty file raises ListError asking for a header row."""
    path = write_text(tmp_path, "")
    with pytest.raises(ListError) as excinfo:
        read_all(path)
    assert "header" in str(excinfo.value)
    assert excinfo.value.path == path


def test_header_without_email_column_is_refused(tmp_path: Path) -> None:
    """A header row without an `email` column raises ListError on line 1, listing what it found."""
    path = write_text(tmp_path, "address,name\na@example.org,A\n")
    with pytest.raises(ListError) as excinfo:
        read_all(path)
    assert excinfo.value.line == 1
    assert "email" in str(excinfo.value)
    assert excinfo.value.hint is not None
    assert "'address'" in excinfo.value.hint


def test_data_row_in_place_of_a_header_is_refused(tmp_path: Path) -> None:
    """A list whose first row is already an address (no header) is refused, not half-read."""
    path = write_text(tmp_path, "a@example.org,A\nb@example.org,B\n")
    with pytest.raises(ListError) as excinfo:
        read_all(path)
    assert excinfo.value.line == 1


def test_duplicate_column_names_are_refused(tmp_path: Path) -> None:
    """Two columns with the same name (after normalization) raise ListError naming the column."""
    path = write_text(tmp_path, "email,Name, name \na@example.org,A,B\n")
    with pytest.raises(ListError) as excinfo:
        read_all(path)
    assert excinfo.value.line == 1
    assert excinfo.value.field == "name"
    assert "twice" in str(excinfo.value)


def test_unnamed_column_is_refused(tmp_path: Path) -> None:
    """A header cell left empty raises ListError naming the column's position."""
    path = write_text(tmp_path, "email,,name\na@example.org,x,A\n")
    with pytest.raises(ListError) as excinfo:
        read_all(path)
    assert "column 2" in str(excinfo.value)


def test_header_names_are_case_and_space_normalized(tmp_path: Path) -> None:
    """` Email `, `NAME` and `Organization ` are understood as email, name and organization."""
    path = write_text(
        tmp_path, " Email ,NAME,Organization , Country\na@example.org,Ann,Branch 7,GB\n"
    )
    [item] = read_all(path)
    assert isinstance(item, Recipient)
    assert item.name == "Ann"
    assert item.organization == "Branch 7"
    assert dict(item.fields) == {"country": "GB"}


# -- control characters --------------------------------------------------------------

CONTROLS = {
    "CR": "\r",
    "LF": "\n",
    "NUL": "\x00",
    "ESC": "\x1b",
    "DEL": "\x7f",
    "NEL (C1)": "\x85",
    "CSI (C1)": "\x9b",
    "LINE SEPARATOR": "\u2028",
    "PARAGRAPH SEPARATOR": "\u2029",
}
HEADER_FIELDS = {
    "email": "an{}x@example.org",
    "name": "Ann{}Bcc: victim@example.com",
    "organization": "Branch{}7",
    "language": "e{}n",
    "timezone": "Europe/{}London",
}


@pytest.mark.parametrize("field", list(HEADER_FIELDS))
@pytest.mark.parametrize("control", list(CONTROLS.values()), ids=list(CONTROLS))
def test_control_character_in_a_header_field_is_refused_naming_line_and_field(
    tmp_path: Path, field: str, control: str
) -> None:
    """A control character inside email/name/organization/language/timezone skips the row."""
    row = {
        "email": "ann@example.org",
        "name": "Ann",
        "organization": "Branch",
        "language": "en",
        "timezone": "Europe/London",
    }
    row[field] = HEADER_FIELDS[field].format(control)
    path = tmp_path / "list.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerow({"email": "first@example.org"})
        writer.writerow(row)
        writer.writerow({"email": "last@example.org"})
    items = read_all(path)
    bad = skipped(items)
    assert len(bad) == 1, items
    assert bad[0].line == 3
    assert bad[0].field == field
    assert f"U+{ord(control):04X}" in bad[0].reason
    assert f"line 3, {field}" in str(bad[0])
    # The row after the refused one keeps its file line: a quoted LF inside a field
    # starts a new line of the file, a lone CR does not.
    good = recipients(items)
    assert [r.email for r in good] == ["first@example.org", "last@example.org"]
    assert [r.line for r in good] == [2, 5 if control == "\n" else 4]
    for recipient in good:
        for value in (recipient.name, recipient.organization, recipient.email):
            assert control not in value


def test_newline_in_an_extra_column_is_allowed(tmp_path: Path) -> None:
    """A line break in a column that only templates see (e.g. a note) is kept, not refused."""
    path = write_text(tmp_path, 'email,name,note\na@example.org,Ann,"first line\nsecond line"\n')
    [item] = read_all(path)
    assert isinstance(item, Recipient)
    assert item.fields["note"] == "first line\nsecond line"


def test_nul_in_an_extra_column_is_refused(tmp_path: Path) -> None:
    """A NUL is refused in any column, even one that only reaches a body."""
    path = write_text(tmp_path, "email,note\na@example.org,bad\x00note\n")
    item = only_skipped(path)
    assert item.field == "note"
    assert "U+0000" in item.reason


@pytest.mark.parametrize("control", ["\r\n", "\n", "\u2028"])
def test_a_trailing_line_break_in_a_name_is_refused_not_trimmed(
    tmp_path: Path, control: str
) -> None:
    """A CR/LF at the end of a name is refused like one in the middle, not silently stripped."""
    path = write_text(tmp_path, f'email,name\na@example.org,"Ann{control}"\n')
    item = only_skipped(path)
    assert item.field == "name"
    assert item.line == 2


def test_a_list_with_bare_cr_line_endings_gets_a_hint_a_person_understands(
    tmp_path: Path,
) -> None:
    """An old-Mac file (lines ending in a bare CR) stops with a hint to save it as CSV UTF-8."""
    path = write_bytes(tmp_path, b"email,name\ra@example.org,Ann\rb@example.org,Bo\r")
    with pytest.raises(ListError) as caught:
        read_all(path)
    assert caught.value.hint is not None
    assert "bare CR" in caught.value.hint
    assert "CSV UTF-8" in caught.value.hint


# -- addresses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["not-an-address", "two@@example.org", "a@b", "a b@example.org", "a@example..org"],
)
def test_invalid_address_is_skipped_with_a_reason(tmp_path: Path, address: str) -> None:
    """A malformed address is a SkippedRow on its line, field email, saying it is invalid."""
    path = write_text(tmp_path, f"email,name\n{address},Ann\n")
    item = only_skipped(path)
    assert item.line == 2
    assert item.field == "email"
    assert "invalid address" in item.reason
    assert repr(address) in item.reason


def test_empty_address_is_skipped(tmp_path: Path) -> None:
    """A row without an address is a SkippedRow saying the address is empty."""
    path = write_text(tmp_path, "email,name\n,Ann\n")
    item = only_skipped(path)
    assert item.field == "email"
    assert "empty" in item.reason


def test_address_is_lower_cased_and_trimmed(tmp_path: Path) -> None:
    """`  Ann.Smith@Example.ORG ` becomes `ann.smith@example.org`."""
    path = write_text(tmp_path, "email\n  Ann.Smith@Example.ORG \n")
    [item] = read_all(path)
    assert isinstance(item, Recipient)
    assert item.email == "ann.smith@example.org"
    assert item.domain == "example.org"


def test_internationalized_domain_is_converted_to_idna(tmp_path: Path) -> None:
    """user@пример.рф is mailed as user@xn--e1afmkfd.xn--p1ai (ASCII, RFC 5890)."""
    path = write_text(tmp_path, "email\nuser@пример.рф\n")
    [item] = read_all(path)
    assert isinstance(item, Recipient)
    assert item.email == "user@xn--e1afmkfd.xn--p1ai"
    assert item.email.isascii()


def test_non_ascii_local_part_is_skipped_as_needing_smtputf8(tmp_path: Path) -> None:
    """A mailbox name outside ASCII would need SMTPUTF8: the row is skipped, saying so."""
    path = write_text(tmp_path, "email\n用户@example.org\n")
    item = only_skipped(path)
    assert item.field == "email"
    assert "SMTPUTF8" in item.reason
    assert item.email == "用户@example.org"


def test_duplicate_after_normalization_is_skipped_naming_the_first_line(tmp_path: Path) -> None:
    """The same address spelled differently is mailed once; the later row names the first."""
    path = write_text(
        tmp_path,
        "email,name\n"
        "Ann@Example.org,Ann\n"
        "user@пример.рф,U\n"
        "other@example.org,O\n"
        "ann@example.ORG,Ann again\n"
        "USER@xn--e1afmkfd.xn--p1ai,U again\n",
    )
    items = read_all(path)
    assert [r.email for r in recipients(items)] == [
        "ann@example.org",
        "user@xn--e1afmkfd.xn--p1ai",
        "other@example.org",
    ]
    dupes = skipped(items)
    assert [(d.line, d.duplicate_of, d.field) for d in dupes] == [
        (5, 2, "email"),
        (6, 3, "email"),
    ]
    assert "duplicate of line 2" in dupes[0].reason


def test_invalid_row_does_not_count_as_the_first_of_a_duplicate(tmp_path: Path) -> None:
    """A skipped row does not claim its address: a later valid spelling of it is mailed."""
    path = write_text(
        tmp_path, "email,timezone\na@example.org,Nowhere/City\nA@example.org,Europe/Paris\n"
    )
    items = read_all(path)
    assert isinstance(items[0], SkippedRow)
    assert isinstance(items[1], Recipient)
    assert items[1].line == 3


# -- the address shortcut: the same verdicts as email-validator ----------------------


def old_normalize_address(text: str) -> str:
    """normalize_address as it was before the shortcut: email-validator for every address."""
    bad = _CONTROL.search(text)
    if bad:
        raise ValueError(f"contains the control character U+{ord(bad.group()):04X}, refused")
    address = unicodedata.normalize("NFC", text).strip()
    if not address:
        raise ValueError("empty address")
    try:
        checked = validate_email(address, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        raise ValueError(f"invalid address {address!r}: {exc}") from exc
    if checked.ascii_email is None:
        raise ValueError(
            f"{address!r} has a non-ASCII mailbox name, which needs SMTPUTF8 (RFC 6531); "
            "appeal-mailer does not send such mail yet"
        )
    return checked.ascii_email.lower()


def verdict(normalize: Callable[[str], str], text: str) -> tuple[str, str]:
    try:
        return ("mailed as", normalize(text))
    except ValueError as exc:
        return ("refused", str(exc))


def assert_same_verdicts(addresses: list[str]) -> None:
    """Each address, in this order from an empty cache, gets the verdict email-validator gives."""
    lists._domain_verdict.cache_clear()
    for text in addresses:
        assert verdict(normalize_address, text) == verdict(old_normalize_address, text), text


_ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"


def _long_domain(length: int, label: str) -> str:
    """A domain of `length` characters: `label` repeated, dot-separated, ending in .org."""
    head = ".".join([label] * (length // (len(label) + 1) + 1))
    return (head[: length - len(".org")] + ".org").replace("..", ".a")


# Valid dot-atoms, the common case, weighted up against the many ways to be invalid.
_dot_atoms = st.lists(
    st.text(alphabet=_ATEXT, min_size=1, max_size=6), min_size=1, max_size=3
).map(".".join)
local_parts = st.one_of(
    _dot_atoms,
    _dot_atoms,
    _dot_atoms,
    # Near misses: leading, trailing and double dots, empty.
    st.text(alphabet=_ATEXT + ".", max_size=12),
    st.builds(
        lambda name, tag: f"{name}+{tag}",
        st.text(alphabet=string.ascii_letters + ".", min_size=1, max_size=8),
        st.text(alphabet=string.ascii_letters + string.digits, max_size=6),
    ),
    # Around the 64-octet local-part limit, and long enough to reach 254 in all.
    st.integers(58, 70).map(lambda n: "a" * n),
    st.integers(220, 260).map(lambda n: "B" * n),
    # Quoted, with what only quotes allow.
    st.text(alphabet=_ATEXT + ' .@"\\,;:<>()[]', max_size=10).map(lambda t: f'"{t}"'),
    # Cyrillic (SMTPUTF8), odd characters, combining marks, full-width and lookalike at-signs.
    st.text(alphabet="абвгдежзийкАБВГ.", min_size=1, max_size=8),
    st.text(alphabet=_ATEXT + ' ,;:<>()[]\\".ä\u0301\u0338п\u3000\uff20\ufe6b', max_size=8),
    st.sampled_from(["", "a", "Postmaster", "INFO", "x..y", ".x", "x.", "Ann <ann", '"a b"']),
)

_label = st.text(alphabet=string.ascii_lowercase + string.digits + "-", max_size=8)
_valid_domains = st.one_of(
    st.sampled_from(
        [
            "example.org",
            "Example.ORG",
            "пример.рф",
            "профсоюз.рф",
            "bücher.de",
            "Straße.de",
            "ÉCOLE.fr",
            "例え.jp",
            # Longer as written than in either of the forms email-validator makes of it.
            "example\uff0eorg",
            "\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.org",
        ]
    ),
    st.builds(
        "{}.{}".format,
        st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=10),
        st.sampled_from(["org", "com", "kz", "рф", "xn--p1ai", "DE"]),
    ),
)
domains = st.one_of(
    _valid_domains,
    _valid_domains,
    # Punycode (valid and not), other label separators, right-to-left labels,
    # special-use names, literals, and malformed domains.
    st.sampled_from(
        [
            "mail.example.co.uk",
            "ПРИМЕР.РФ",
            "xn--e1afmkfd.xn--p1ai",
            "xn--80ak6aa92e.com",
            "xn--abc.com",
            "example\u3002org",
            "אב.1.com",
            "1.xn--4dbc.com",
            "\u0301example.org",
            "localhost",
            "printer.local",
            "site.test",
            "nothing.invalid",
            "example",
            "host.arpa",
            "secret.onion",
            "example.123",
            "192.168.0.1",
            "[192.168.0.1]",
            "[IPv6:2001:db8::1]",
            "[ipv6:fe80::1%eth0]",
            "[1.2.3]",
            "[tag:value]",
            "a..example.org",
            ".example.org",
            "example.org.",
            "-example.org",
            "ab--cd.example.org",
            "example.org>",
            "@example.org",
            "exa mple.org",
            "exa_mple.org",
            "",
        ]
    ),
    # Empty labels, hyphens in odd places, numeric top-level domains.
    st.lists(_label, min_size=1, max_size=4).map(".".join),
    st.lists(
        st.text(alphabet="абвгдüößé-" + string.ascii_lowercase, min_size=1, max_size=10),
        min_size=2,
        max_size=3,
    ).map(".".join),
    # Around the 253-character domain limit and the 63-octet label limit, in ASCII
    # and in forms whose IDNA ASCII or UTF-8 is longer than the text.
    st.builds(
        _long_domain,
        st.integers(230, 256),
        st.sampled_from(["a" * 63, "b" * 64, "c" * 20, "ü" * 20, "я" * 9, "x\uff0ey"]),
    ),
)


@st.composite
def addresses_at_shared_domains(draw: st.DrawFn) -> list[str]:
    """Several local parts at each of a few domains, shuffled: a domain is met again and again.

    Each domain also gets a local part that brings the address as written to a
    few octets either side of 254, so the length limits are met from both sides.
    """
    at = draw(st.lists(domains, min_size=1, max_size=3))
    before = draw(st.lists(local_parts, min_size=1, max_size=5))
    texts = [
        f"{local}@{domain}" if draw(st.booleans()) else f" {local}@{domain.upper()} "
        for local in before
        for domain in at
    ]
    for domain in at:
        padding = 253 - len(domain.encode()) + draw(st.integers(-4, 8))
        texts.append("p" * max(padding, 1) + "@" + domain)
    return draw(st.permutations(texts))


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(addresses=addresses_at_shared_domains())
def test_every_address_gets_the_verdict_email_validator_gives_it(addresses: list[str]) -> None:
    """Remembering domains and skipping plain local parts change no result and no message.

    Valid and invalid addresses at the same domain come in either order, so a
    domain is remembered from one kind of address and then used for the other.
    """
    assert_same_verdicts(addresses)


@pytest.mark.parametrize(
    "addresses",
    [
        # 254 octets in all is accepted, 255 refused, whatever the local part's length.
        ["a" * 242 + "@example.org", "a" * 243 + "@example.org", "a" * 242 + "@example.org"],
        ["a" * 64 + "@example.org", "a" * 65 + "@example.org"],
        # The IDNA ASCII form is the longest: 254 accepted, 255 refused saying so.
        ["u" * 233 + "@пример.рф", "u" * 232 + "@пример.рф", "u" * 233 + "@пример.рф"],
        # The form as written (a full-width dot, 3 octets) is the longest.
        [
            "u" * 241 + "@example\uff0eorg",
            "u" * 240 + "@example\uff0eorg",
            "u" * 242 + "@example\uff0eorg",
        ],
        # A domain of 252 characters takes a one-octet local part only; at 253 characters
        # nothing fits (nor does the shortcut's own probe of the domain, "a@" in front).
        ["xy@" + _long_domain(252, "a" * 63), "x@" + _long_domain(252, "a" * 63)],
        ["x@" + _long_domain(253, "a" * 63), "x@" + _long_domain(251, "a" * 63)],
        # A valid address, then invalid ones at its domain, and the reverse.
        ["ann@example.org", "ann..b@example.org", '"a b"@example.org', "анна@example.org"],
        ["анна@example.org", '"a b"@example.org', ".ann@example.org", "ann@example.org"],
        ["a@localhost", "b@localhost", "a@[127.0.0.1]", "b@[127.0.0.1]", "Ann <a@example.org>"],
        ['"ann"@example.org', "ann@example.org", "Postmaster@Example.ORG", "x@exa_mple.org"],
    ],
)
def test_addresses_near_the_limits_get_the_verdicts_email_validator_gives(
    addresses: list[str],
) -> None:
    """At and past the length limits, and with each kind of address first, nothing changes."""
    assert_same_verdicts(addresses)


def test_under_nfc_no_character_combines_with_the_at_sign_nor_ascii_with_ascii() -> None:
    """The shortcut's split at the first "@" is email-validator's, in this Unicode version.

    email-validator does not split at a character that NFC combines with the ones
    after it; a dot-atom local part is ASCII followed by ASCII, then "@".
    """
    at_sign = [
        cp for cp in range(0x110000) if unicodedata.normalize("NFC", f"@{chr(cp)}")[0] != "@"
    ]
    ascii_pairs = [
        (a, b)
        for a in map(chr, range(128))
        for b in map(chr, range(128))
        if unicodedata.normalize("NFC", a + b) != a + b
    ]
    assert (at_sign, ascii_pairs) == ([], [])


def test_a_domain_is_validated_once_for_its_plain_addresses() -> None:
    """The second plain address at a domain, spelled alike, reuses email-validator's verdict."""
    lists._domain_verdict.cache_clear()
    assert normalize_address("Ann@Пример.РФ") == "ann@xn--e1afmkfd.xn--p1ai"
    assert normalize_address("bob+news@Пример.РФ") == "bob+news@xn--e1afmkfd.xn--p1ai"
    info = lists._domain_verdict.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_the_remembered_domains_are_bounded() -> None:
    """Past _DOMAINS_REMEMBERED distinct domains the least recently used are forgotten."""
    lists._domain_verdict.cache_clear()
    limit = lists._DOMAINS_REMEMBERED
    for number in range(limit + 100):
        normalize_address(f"member@branch{number}.example.org")
    info = lists._domain_verdict.cache_info()
    assert (info.maxsize, info.currsize) == (limit, limit)
    lists._domain_verdict.cache_clear()


def test_memory_stays_flat_however_many_domains_a_list_has(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the cache full, 1000 more distinct domains take no more memory.

    Measured with room for 100 domains, so that tracemalloc sees the entries it
    forgets being allocated (and their memory returned); the mechanism is the same.
    """
    small = functools.lru_cache(maxsize=100)(lists._domain_verdict.__wrapped__)
    monkeypatch.setattr(lists, "_domain_verdict", small)
    tracemalloc.start()
    try:
        for number in range(100):
            normalize_address(f"member@branch{number}.example.org")
        before = tracemalloc.get_traced_memory()[0]
        for number in range(100, 1100):
            normalize_address(f"member@branch{number}.example.org")
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert small.cache_info().currsize == 100
    # Remembering all 1000 would take about 300 KB.
    assert growth < 20_000, f"grew by {growth} bytes"


# -- language and time zone ----------------------------------------------------------


def test_unknown_timezone_is_skipped_naming_the_field(tmp_path: Path) -> None:
    """A time zone that is not an IANA name skips the row, field timezone."""
    path = write_text(tmp_path, "email,timezone\na@example.org,Mars/Olympus_Mons\n")
    item = only_skipped(path)
    assert item.line == 2
    assert item.field == "timezone"
    assert "Mars/Olympus_Mons" in item.reason


def test_path_like_timezone_is_skipped_not_read_from_disk(tmp_path: Path) -> None:
    """A time zone like `../../etc/passwd` is refused as unknown, not an error for the list."""
    path = write_text(tmp_path, "email,timezone\na@example.org,../../etc/passwd\n")
    item = only_skipped(path)
    assert item.field == "timezone"


def test_known_timezone_and_language_are_kept(tmp_path: Path) -> None:
    """A valid IANA zone is kept as written; a language tag is lower-cased with `_` -> `-`."""
    path = write_text(tmp_path, "email,language,timezone\na@example.org,zh_TW,Asia/Taipei\n")
    [item] = read_all(path)
    assert isinstance(item, Recipient)
    assert item.timezone == "Asia/Taipei"
    assert item.language == "zh-tw"


@pytest.mark.parametrize("language", ["english!", "e", "12", "en--us"])
def test_bad_language_tag_is_skipped_naming_the_field(tmp_path: Path, language: str) -> None:
    """A value that is not a language tag skips the row, field language."""
    path = write_text(tmp_path, f"email,language\na@example.org,{language}\n")
    item = only_skipped(path)
    assert item.field == "language"
    assert "language tag" in item.reason


# -- row shape, blank lines, line numbers --------------------------------------------


@pytest.mark.parametrize("row", ["a@example.org,Ann,extra", "a@example.org"])
def test_row_with_wrong_number_of_fields_is_skipped_as_broken(tmp_path: Path, row: str) -> None:
    """A row with more or fewer fields than the header is skipped as a broken row."""
    path = write_text(tmp_path, f"email,name\n{row}\nb@example.org,Bob\n")
    items = read_all(path)
    first = items[0]
    assert isinstance(first, SkippedRow)
    assert first.line == 2
    assert "broken row" in first.reason
    assert isinstance(items[1], Recipient)
    assert items[1].line == 3


def test_blank_lines_are_ignored_and_do_not_shift_line_numbers(tmp_path: Path) -> None:
    """Blank lines (also only spaces) are skipped silently; later rows keep their file line."""
    path = write_text(tmp_path, "email,name\n\na@example.org,A\n   \n\r\nb@example.org,B\n\n")
    items = read_all(path)
    assert all(isinstance(item, Recipient) for item in items)
    assert [(item.email, item.line) for item in recipients(items)] == [
        ("a@example.org", 3),
        ("b@example.org", 6),
    ]


def test_multiline_quoted_field_keeps_line_numbers_of_following_rows(tmp_path: Path) -> None:
    """A quoted field spanning three lines: the rows after it keep their file line numbers."""
    path = write_text(
        tmp_path,
        "email,name,note\n"
        "a@example.org,A,one line\n"
        'b@example.org,B,"spans\nthree\nlines"\n'
        "c@example.org,C,\n"
        "bad,D,\n",
    )
    items = read_all(path)
    assert [(item.line, type(item).__name__) for item in items] == [
        (2, "Recipient"),
        (3, "Recipient"),
        (6, "Recipient"),
        (7, "SkippedRow"),
    ]


def test_crlf_line_endings_are_read(tmp_path: Path) -> None:
    """A list saved with Windows line endings reads the same, without CR in any field."""
    path = write_text(
        tmp_path, "email,name,note\r\na@example.org,Ann,x\r\nb@example.org,Bob,y\r\n"
    )
    items = read_all(path)
    assert [(r.email, r.name, r.fields["note"], r.line) for r in recipients(items)] == [
        ("a@example.org", "Ann", "x", 2),
        ("b@example.org", "Bob", "y", 3),
    ]


def test_extra_columns_reach_fields(tmp_path: Path) -> None:
    """Every column other than the known five lands in `fields`, the known ones do not."""
    path = write_text(
        tmp_path,
        "email,name,organization,language,timezone,country,Branch Code\n"
        "a@example.org,Ann,Union,en,Europe/London,GB,B-7\n",
    )
    [item] = read_all(path)
    assert isinstance(item, Recipient)
    assert dict(item.fields) == {"country": "GB", "branch code": "B-7"}
    assert (item.name, item.organization, item.language, item.timezone) == (
        "Ann",
        "Union",
        "en",
        "Europe/London",
    )
    with pytest.raises(TypeError):
        item.fields["country"] = "KZ"  # type: ignore[index]  # proving it is read-only


def test_shipped_example_list_reads_without_skips() -> None:
    """The example list shipped with the project is all valid recipients."""
    path = Path(__file__).resolve().parent.parent / "lists" / "unions.csv"
    items = read_all(path)
    assert skipped(items) == []
    assert len(items) == 27
    assert items[0].line == 2


def test_missing_file_is_a_list_error(tmp_path: Path) -> None:
    """A list that does not exist raises ListError naming the path."""
    path = tmp_path / "nope.csv"
    with pytest.raises(ListError) as excinfo:
        read_all(path)
    assert excinfo.value.path == path


# -- streaming -----------------------------------------------------------------------


def _generated_rows(count: int) -> Iterator[str]:
    yield "email,name,organization,language,timezone,note\n"
    for i in range(count):
        yield (
            f"member{i}@example.org,Member Number {i},Branch {i % 97},en,Europe/London,"
            f"a note that only templates see - row {i}\n"
        )


# Run in a child process so that the peak resident size measures this read alone, not
# whatever earlier tests allocated. (tracemalloc would do, but it makes a 200,000-row
# read several times slower: email-validator allocates a lot per address.)
_MEASURE_READ = """
import resource, sys
from pathlib import Path
from appeal_mailer.lists import read_recipients
from appeal_mailer.models import Recipient

def peak() -> int:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib if sys.platform == "darwin" else kib * 1024  # macOS reports bytes

# Warm up: load email-validator's and idna's tables before the baseline.
sum(1 for _ in read_recipients(Path(sys.argv[2])))
before = peak()
count = sum(1 for item in read_recipients(Path(sys.argv[1])) if isinstance(item, Recipient))
print(count, peak() - before)
"""


def test_large_list_is_streamed_not_held_in_memory(tmp_path: Path) -> None:
    """Reading a 200,000-row list keeps only what dedup needs: peak memory grows little."""
    path = tmp_path / "big.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.writelines(_generated_rows(200_000))
    small = tmp_path / "small.csv"
    with small.open("w", encoding="utf-8", newline="") as handle:
        handle.writelines(_generated_rows(100))

    result = subprocess.run(
        [sys.executable, "-c", _MEASURE_READ, str(path), str(small)],
        capture_output=True,
        text=True,
        check=True,
    )
    count, growth = (int(part) for part in result.stdout.split())
    assert count == 200_000
    # The addresses seen so far (for dedup) take about 30 MB here; holding 200,000
    # Recipients with their fields would take well over 100 MB.
    assert growth < 60 * 1024 * 1024, f"peak grew by {growth / 2**20:.1f} MiB"


def test_first_rows_are_yielded_before_the_end_of_the_file_is_read(tmp_path: Path) -> None:
    """The reader yields the first recipient without reading on to a broken row further down."""
    path = tmp_path / "big.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.writelines(_generated_rows(20_000))
        handle.write('broken@example.org,"never closed\n')
    stream = read_recipients(path)
    first = next(stream)
    assert isinstance(first, Recipient)
    assert first.email == "member0@example.org"
    with pytest.raises(ListError) as excinfo:
        for _ in stream:
            pass
    assert excinfo.value.line == 20_002


def test_duplicates_are_found_after_the_addresses_move_to_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past _IN_MEMORY addresses the rest are remembered on disk, and duplicates still are found.

    With room for 3 in memory, a list of 8 has duplicates of an address read
    before the move (a@) and of one read after it (f@): each names its first line.
    """
    monkeypatch.setattr("appeal_mailer.lists._IN_MEMORY", 3)
    rows = ["a", "b", "c", "d", "a", "f", "F", "g"]
    path = write_text(tmp_path, "email\n" + "".join(f"{r}@example.org\n" for r in rows))
    items = read_all(path)
    assert [i.email for i in items if isinstance(i, Recipient)] == [
        f"{r}@example.org" for r in ("a", "b", "c", "d", "f", "g")
    ]
    skipped = [(i.line, i.duplicate_of) for i in items if isinstance(i, SkippedRow)]
    assert skipped == [(6, 2), (8, 7)]
