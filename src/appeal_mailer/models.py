"""Frozen value objects that cross module boundaries: recipients, messages, results, states."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

_EMPTY: Mapping[str, str] = MappingProxyType({})

# Campaign and step names go into Message-IDs, List-Id and file names, so they
# are dot-atoms (RFC 5322 3.2.3): no leading, trailing or doubled dot.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$"
NAME_MAX = 64


class State(enum.StrEnum):
    """The one state of a (campaign, step, recipient) row in the ledger."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"
    UNKNOWN = "unknown"
    SUPPRESSED = "suppressed"
    INVALID = "invalid"
    # A reminder that came due too long ago (cron was down): recorded, never sent late.
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Recipient:
    """One subscriber, validated: the address is normalized and every field is header-safe."""

    email: str
    line: int
    name: str = ""
    organization: str = ""
    language: str = ""
    timezone: str = ""
    # Every other column of the list, for templates.
    fields: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    def __str__(self) -> str:
        return f"{self.name} <{self.email}>" if self.name else self.email

    @property
    def domain(self) -> str:
        return self.email.rpartition("@")[2]

    def data_json(self) -> str:
        """Everything but the address and line, as JSON: how the ledger and the spool keep it."""
        return json.dumps(
            {
                "name": self.name,
                "organization": self.organization,
                "language": self.language,
                "timezone": self.timezone,
                "fields": dict(self.fields),
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # `fields` is a read-only view, which pickle refuses; it crosses as a dict
        # (recipients go to and come from the ledger's process, ledger_process.py).
        return (
            _recipient,
            (
                self.email,
                self.line,
                self.name,
                self.organization,
                self.language,
                self.timezone,
                dict(self.fields),
            ),
        )

    @classmethod
    def from_data_json(cls, email: str, line: int, data: str) -> Recipient:
        values = json.loads(data)
        return cls(
            email=email,
            line=line,
            name=values["name"],
            organization=values["organization"],
            language=values["language"],
            timezone=values["timezone"],
            fields=MappingProxyType(values["fields"]),
        )


def _recipient(  # noqa: PLR0917  # Recipient's fields, as pickle passes them
    email: str,
    line: int,
    name: str,
    organization: str,
    language: str,
    timezone: str,
    fields: dict[str, str],
) -> Recipient:
    return Recipient(email, line, name, organization, language, timezone, MappingProxyType(fields))


class Listed(NamedTuple):
    """A checked recipient as the ledger records it: address, list line, Recipient.data_json.

    What a run loads into the ledger, read from its spool as it was written: the
    data stays JSON, never decoded into a Recipient only to be encoded again, and
    crosses to the ledger's process as a plain tuple.
    """

    email: str
    line: int
    data: str

    def data_json(self) -> str:
        return self.data


@dataclass(frozen=True, slots=True)
class SkippedRow:
    """A list row that is not mailed, and why; reported by line number."""

    line: int
    reason: str
    field: str | None = None
    email: str | None = None
    duplicate_of: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", {self.field}" if self.field else "")
        return f"{where}: {self.reason}"


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    """A message rendered for one recipient, before it becomes wire bytes."""

    recipient: Recipient
    step: str
    subject: str
    text: str
    html: str | None = None


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a transport needs: the SMTP envelope and the finished bytes (CRLF, not dot-stuffed)."""

    row_id: int
    sender: str
    recipient: str
    message_id: str
    data: bytes


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """What happened to one message: sent, deferred, failed or unknown, with the server's reply."""

    row_id: int
    recipient: str
    state: State
    attempts: int
    code: int | None = None
    reply: str | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # As a constructor call, cheaper than a slots dataclass's own pickling:
        # every result crosses to the ledger's process (ledger_process.py).
        return (
            DeliveryResult,
            (self.row_id, self.recipient, self.state, self.attempts, self.code, self.reply),
        )

    def __str__(self) -> str:
        said = f": {self.code} {self.reply}" if self.code is not None else ""
        reply = said or (f": {self.reply}" if self.reply else "")
        return f"{self.recipient} {self.state}{reply}"
