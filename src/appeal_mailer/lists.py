"""Read address files (a subscriber list, a do-not-mail file) as streams of validated rows."""

from __future__ import annotations

import contextlib
import csv
import functools
import itertools
import re
import sqlite3
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from email_validator import EmailNotValidError, validate_email

from appeal_mailer.errors import ListError
from appeal_mailer.models import Recipient, SkippedRow

if TYPE_CHECKING:
    from _csv import Reader

KNOWN_COLUMNS = ("email", "name", "organization", "language", "timezone")
_BOM = b"\xef\xbb\xbf"
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: none of
# them may reach a header or the SMTP envelope (RFC 5322 2.2, RFC 5321 4.1.2).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Other columns reach templates, maybe only a body: line breaks and tabs are
# allowed there, and the renderer refuses them in a header value.
_CONTROL_IN_BODY = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[a-z0-9]{1,8})*$")
_FIELD_SIZE_LIMIT = 64 * 1024
# Addresses remembered in memory before the rest go to disk (see _SeenAddresses).
_IN_MEMORY = 50_000
# RFC 5322 3.2.3 dot-atom-text in ASCII: runs of atext joined by single dots. A
# local part of this form is one email-validator takes as it is (see _shortcut).
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
# email-validator's limits: a domain longer than this many characters is refused
# before anything else is looked at, and an address longer than this many octets
# (RFC 5321 4.5.3.1.3 with RFC 3696 erratum 1690) is refused at the end.
_DOMAIN_MAX_CHARS = 253
_ADDRESS_MAX_OCTETS = 254
# Distinct domains whose verdict is remembered (see _domain_verdict), the least
# recently used forgotten first: about 300 bytes each (1.5 KB for the longest
# domain), so 1-6 MB however long the list and however many domains it has.
_DOMAINS_REMEMBERED = 4096


def read_recipients(path: Path) -> Iterator[Recipient | SkippedRow]:
    """Yield each row of `path` as a Recipient, or as a SkippedRow saying why it is not mailed.

    The list is read as a stream: only the addresses seen so far are kept (to mail
    duplicates once). A problem with the file as a whole raises ListError.
    """
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ListError(f"cannot open: {exc.strerror}", path=path) from exc
    with handle:
        lines = _decoded_lines(handle, path)
        reader = csv.reader(lines, strict=True)
        csv.field_size_limit(_FIELD_SIZE_LIMIT)
        header = _read_header(reader, path)
        with contextlib.closing(_SeenAddresses()) as seen:
            for start, row in _rows(reader, path):
                item = _recipient(header, row, start)
                if isinstance(item, Recipient):
                    first = seen.first_line(item.email.lower(), start)
                    if first is not None:
                        item = SkippedRow(
                            start,
                            f"duplicate of line {first}",
                            field="email",
                            email=item.email,
                            duplicate_of=first,
                        )
                yield item


class _SeenAddresses:
    """The addresses read so far, each with its line: in memory up to a point, then on disk.

    Mailing duplicates once means remembering every address of the list; in a
    dict that is about 150 bytes each, 150 MB for a 1,000,000-row list. Up to
    _IN_MEMORY addresses (7 MB, measured) stay in a dict, which costs nothing per row;
    past that they move to SQLite's private temporary database (deleted on close),
    on disk behind a bounded page cache, so memory stays flat whatever the list's
    length. It is scratch space for one read of one list, not the ledger
    (ledger.py), and no smaller library offers an on-disk set (`dbm.dumb` keeps
    its index in memory).
    """

    def __init__(self) -> None:
        self._memory: dict[str, int] | None = {}
        self._db: sqlite3.Connection | None = None

    def first_line(self, email: str, line: int) -> int | None:
        """None if `email` is new (now remembered at `line`), else the line it was first on."""
        if self._memory is not None:
            first = self._memory.setdefault(email, line)
            if first != line:
                return first
            if len(self._memory) >= _IN_MEMORY:
                self._spill(self._memory)
                self._memory = None
            return None
        assert self._db is not None  # noqa: S101  # _spill made it
        added = self._db.execute(
            "INSERT INTO seen VALUES (?, ?) ON CONFLICT (email) DO NOTHING", (email, line)
        )
        if added.rowcount == 1:
            return None
        (first,) = self._db.execute("SELECT line FROM seen WHERE email = ?", (email,)).fetchone()
        return int(first)

    def _spill(self, addresses: dict[str, int]) -> None:
        # "": a private temporary database on disk (https://www.sqlite.org/inmemorydb.html).
        self._db = sqlite3.connect("", isolation_level=None)
        # Scratch data: no journal, no flush; lost with the process, as it should be.
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE seen (email TEXT PRIMARY KEY, line INTEGER) WITHOUT ROWID")
        self._db.execute("BEGIN")
        self._db.executemany("INSERT INTO seen VALUES (?, ?)", addresses.items())

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


def normalize_address(text: str) -> str:
    """`text` as the address appeal-mailer mails and records: validated, ASCII, lower-cased.

    The one place an address is checked (email-validator, no DNS look-up), for
    lists and the do-not-mail list alike. Raises ValueError saying why `text`
    cannot be mailed.
    """
    # Searched before stripping: a trailing CR/LF is refused, not trimmed away.
    bad = _CONTROL.search(text)
    if bad:
        raise ValueError(f"contains the control character U+{ord(bad.group()):04X}, refused")
    address = unicodedata.normalize("NFC", text).strip()
    if not address:
        raise ValueError("empty address")
    shortcut = _shortcut(address)
    if shortcut is not None:
        return shortcut
    try:
        checked = validate_email(address, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        raise ValueError(f"invalid address {address!r}: {exc}") from exc
    if checked.ascii_email is None:
        raise ValueError(
            f"{address!r} has a non-ASCII mailbox name, which needs SMTPUTF8 (RFC 6531); "
            "appeal-mailer does not send such mail yet"
        )
    # Lower-cased whole: mailbox names are case-insensitive in practice, and a
    # list rarely spells one address the same way twice.
    return checked.ascii_email.lower()


class _Domain(NamedTuple):
    """What email-validator made of a domain that it accepted after a plain local part."""

    ascii: str
    # The most UTF-8 octets of its three forms (as written, normalized, IDNA ASCII),
    # which email-validator each measures with the local part in front.
    longest: int


def _shortcut(address: str) -> str | None:
    """What email-validator would make of `address` if known without calling it, else None.

    email-validator spends tens of µs on an address, most of it on the domain
    (IDNA mapping, Unicode checks), which a list repeats for every address at the
    same few domains. For an address whose local part is ASCII dot-atom-text,
    each of its steps is known from the domain's verdict and a few lengths:

    - it splits at the first "@": no local-part character is special to it, and
      under NFC no ASCII character combines with a following ASCII one, nor "@"
      with any (so its check for combining characters changes nothing);
    - it takes such a local part unchanged (its quoting, SMTPUTF8, and Unicode
      normalization steps all concern other local parts), does not check its
      length (64 octets, in strict mode only), and lower-cases some RFC 2142
      names, which makes no difference once the whole address is lower-cased;
    - it validates the domain on its own (_domain_verdict remembers that);
    - it then measures the address in three forms, done here from the lengths.

    Anything else (no "@", a quoted or non-ASCII local part, a domain it refuses,
    an address near the length limit) goes to email-validator as before, so its
    error messages stay its own.
    """
    local, at, domain = address.partition("@")
    # A domain this long is refused anyway; not remembering it keeps each entry small.
    if not at or len(domain) > _DOMAIN_MAX_CHARS or not _DOT_ATOM.fullmatch(local):
        return None
    verdict = _domain_verdict(domain)
    if verdict is None or len(local) + 1 + verdict.longest > _ADDRESS_MAX_OCTETS:
        return None
    return f"{local}@{verdict.ascii}".lower()


@functools.lru_cache(maxsize=_DOMAINS_REMEMBERED)
def _domain_verdict(domain: str) -> _Domain | None:
    """email-validator's verdict on `domain` after the local part `a`; None if it refused.

    Asked through validate_email itself (its domain functions are not public API).
    A refusal is not remembered as a message: it might be about the length of
    this probe rather than the domain, so such addresses are validated in full.
    """
    try:
        checked = validate_email(f"a@{domain}", check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError:
        return None
    longest = max(len(form.encode()) for form in (domain, checked.domain, checked.ascii_domain))
    return _Domain(checked.ascii_domain, longest)


@dataclass(frozen=True, slots=True)
class AddressLine:
    """One valid address of a do-not-mail file, normalized, with its line and the file's reason."""

    line: int
    email: str
    reason: str = ""


def read_addresses(path: Path) -> Iterator[AddressLine | SkippedRow]:
    """Yield each address of `path`, or a SkippedRow saying why a line is not one.

    `path` is a CSV whose header names an `email` column (and maybe `reason`), or
    else one address per line. Read as a stream; nothing is kept. A problem
    with the file as a whole raises ListError.
    """
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ListError(f"cannot open: {exc.strerror}", path=path) from exc
    with handle:
        lines = _decoded_lines(handle, path)
        first = next(lines, None)
        if first is None:
            return
        lines = itertools.chain([first], lines)
        if not _names_email(first):
            for number, line in enumerate(lines, start=1):
                text = line.rstrip("\r\n")
                if text.strip():
                    yield _address_line(number, text, "", field=None)
            return
        reader = csv.reader(lines, strict=True)
        csv.field_size_limit(_FIELD_SIZE_LIMIT)
        header = _read_header(reader, path)
        email = header.index("email")
        reason = header.index("reason") if "reason" in header else None
        for start, row in _rows(reader, path):
            if len(row) != len(header):
                yield SkippedRow(
                    start, f"has {len(row)} fields, the header has {len(header)}: a broken row"
                )
                continue
            note = row[reason].strip() if reason is not None else ""
            yield _address_line(start, row[email], note, field="email")


def _names_email(first_line: str) -> bool:
    # A first line naming an `email` column is a CSV header; anything else is an address.
    try:
        cells = next(csv.reader([first_line]))
    except (csv.Error, StopIteration):
        return False
    return "email" in (_column_name(cell) for cell in cells)


def _address_line(
    line: int, text: str, reason: str, *, field: str | None
) -> AddressLine | SkippedRow:
    try:
        return AddressLine(line, normalize_address(text), reason)
    except ValueError as exc:
        return SkippedRow(line, str(exc), field=field, email=text.strip() or None)


def _rows(reader: Reader, path: Path) -> Iterator[tuple[int, list[str]]]:
    """Each non-blank row after the header, with the line it starts on."""
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ListError(f"broken CSV: {exc}", path=path, line=start, hint=_hint(exc)) from exc
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        yield start, row


def _decoded_lines(handle: Iterable[bytes], path: Path) -> Iterator[str]:
    # Decoding line by line (not with a TextIOWrapper) lets an undecodable byte
    # be reported with its line number.
    for number, line in enumerate(handle, start=1):
        raw = line[len(_BOM) :] if number == 1 and line.startswith(_BOM) else line
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ListError(
                f"not UTF-8: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}",
                path=path,
                line=number,
                hint="save the list as 'CSV UTF-8' in your spreadsheet program",
            ) from None


def _hint(exc: csv.Error) -> str:
    if "new-line character" in str(exc):
        return (
            "the lines end in a bare CR (an old Mac format): save the list again as "
            "'CSV UTF-8' in your spreadsheet program"
        )
    return "a quote is probably unbalanced; everything after it would be misread"


def _read_header(reader: Iterator[list[str]], path: Path) -> list[str]:
    try:
        header = next(reader)
    except StopIteration:
        raise ListError("the file is empty: a header row is required", path=path) from None
    except csv.Error as exc:
        raise ListError(f"broken CSV header: {exc}", path=path, line=1, hint=_hint(exc)) from exc
    names = [_column_name(name) for name in header]
    if "email" not in names:
        raise ListError(
            "no 'email' column in the header row",
            path=path,
            line=1,
            hint="the first row must name the columns, one of them 'email'; found: "
            + ", ".join(repr(n) for n in names),
        )
    for index, name in enumerate(names):
        if not name:
            raise ListError(f"column {index + 1} has no name", path=path, line=1)
        if names.index(name) != index:
            raise ListError(f"column {name!r} appears twice", path=path, line=1, field=name)
    return names


def _recipient(header: list[str], row: list[str], line: int) -> Recipient | SkippedRow:
    if len(row) != len(header):
        return SkippedRow(
            line, f"has {len(row)} fields, the header has {len(header)}: a broken row"
        )
    values: dict[str, str] = {}
    for name, raw in zip(header, row, strict=True):
        value = unicodedata.normalize("NFC", raw)
        pattern = _CONTROL if name in KNOWN_COLUMNS else _CONTROL_IN_BODY
        # Searched before stripping: a trailing CR/LF is refused, not trimmed away.
        bad = pattern.search(value)
        if bad:
            return SkippedRow(
                line,
                f"contains the control character U+{ord(bad.group()):04X}, refused",
                field=name,
            )
        values[name] = value.strip()

    address = values.pop("email")
    try:
        email = normalize_address(address)
    except ValueError as exc:
        return SkippedRow(line, str(exc), field="email", email=address or None)

    timezone = values.pop("timezone", "")
    if timezone:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            return SkippedRow(
                line, f"unknown time zone {timezone!r} (use e.g. Asia/Almaty)", field="timezone"
            )
    language = values.pop("language", "").lower().replace("_", "-")
    if language and not _LANGUAGE.match(language):
        return SkippedRow(
            line, f"{language!r} is not a language tag (use e.g. en, ru, kk)", field="language"
        )
    return Recipient(
        email=email,
        line=line,
        name=values.pop("name", ""),
        organization=values.pop("organization", ""),
        language=language,
        timezone=timezone,
        fields=MappingProxyType(values),
    )


def _column_name(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip().lower()
