"""Read a subscriber list (CSV) as a stream of validated, de-duplicated recipients."""

from __future__ import annotations

import csv
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import MappingProxyType
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from email_validator import EmailNotValidError, validate_email

from appeal_mailer.errors import ListError
from appeal_mailer.models import Recipient, SkippedRow

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
        seen: dict[str, int] = {}
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise ListError(
                    f"broken CSV: {exc}", path=path, line=start, hint=_hint(exc)
                ) from exc
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            item = _recipient(header, row, start)
            if isinstance(item, Recipient):
                key = item.email.lower()
                first = seen.get(key)
                if first is not None:
                    item = SkippedRow(
                        start,
                        f"duplicate of line {first}",
                        field="email",
                        email=item.email,
                        duplicate_of=first,
                    )
                else:
                    seen[key] = start
            yield item


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
    names = [unicodedata.normalize("NFC", name).strip().lower() for name in header]
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


def _recipient(  # noqa: PLR0911  # one early return per way a row can be refused
    header: list[str], row: list[str], line: int
) -> Recipient | SkippedRow:
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
    if not address:
        return SkippedRow(line, "empty address", field="email")
    try:
        checked = validate_email(address, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        return SkippedRow(line, f"invalid address {address!r}: {exc}", field="email")
    if checked.ascii_email is None:
        return SkippedRow(
            line,
            f"{address!r} has a non-ASCII mailbox name, which needs SMTPUTF8 (RFC 6531); "
            "appeal-mailer does not send such mail yet",
            field="email",
            email=address,
        )

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
        # Lower-cased whole: mailbox names are case-insensitive in practice, and a
        # list rarely spells one address the same way twice.
        email=checked.ascii_email.lower(),
        line=line,
        name=values.pop("name", ""),
        organization=values.pop("organization", ""),
        language=language,
        timezone=timezone,
        fields=MappingProxyType(values),
    )
