"""Time-zone arithmetic for templates, from IANA data (zoneinfo + tzdata), never typed in."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo


def zone(name: str) -> ZoneInfo:
    """The IANA zone `name` (a ZoneInfoNotFoundError names it when unknown)."""
    return ZoneInfo(name)


def hours_ahead(tz: str, of: str, at: datetime | None = None) -> float | int:
    """How many hours `tz` is ahead of `of` at the moment `at` (now by default).

    "Karaganda is 5 hours ahead of London" in January and 4 in July: the answer
    depends on the date because of daylight saving time.
    """
    moment = at if at is not None else datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    a = moment.astimezone(zone(tz)).utcoffset() or timedelta(0)
    b = moment.astimezone(zone(of)).utcoffset() or timedelta(0)
    hours = (a - b).total_seconds() / 3600
    return int(hours) if hours.is_integer() else hours


@dataclass(frozen=True)
class OfficeHours:
    """Opening hours of a place, expressed in another time zone on one day."""

    start: datetime
    end: datetime
    place_start: datetime
    place_end: datetime

    def __str__(self) -> str:
        return self.text()

    def text(self, next_day: str = " (ending the next day)") -> str:
        """ "09:00-18:00"; `next_day` follows when the hours end on the next day.

        A template in another language passes its own words: the Russian ones
        say `hours.text(" следующего дня")`.
        """
        # The fields, not f"{self.start:%H:%M}": strftime was 6 % of rendering the protest.
        start, end = self.start, self.end
        text = f"{start.hour:02d}:{start.minute:02d}\N{EN DASH}{end.hour:02d}:{end.minute:02d}"
        if self.end.date() != self.start.date():
            text += next_day
        return text

    @property
    def day_shift(self) -> int:
        """Days between the place's date and the local date at opening (-1, 0 or 1)."""
        return (self.start.date() - self.place_start.date()).days


def office_hours(
    tz: str, hours: str, in_tz: str, on: date | datetime | None = None
) -> OfficeHours:
    """Office hours "HH:MM-HH:MM" of a place in zone `tz`, shown in zone `in_tz`, on a day.

    `on` is the place's calendar day (a datetime is first converted to `tz`); today
    by default, so the conversion uses the offset in force on that day.
    """
    place = zone(tz)
    opens, closes = _parse_hours(hours)
    if on is None:
        day = datetime.now(place).date()
    elif isinstance(on, datetime):
        day = (on if on.tzinfo else on.replace(tzinfo=UTC)).astimezone(place).date()
    else:
        day = on
    place_start = datetime.combine(day, opens, tzinfo=place)
    place_end = datetime.combine(day, closes, tzinfo=place)
    target = zone(in_tz)
    return OfficeHours(
        start=place_start.astimezone(target),
        end=place_end.astimezone(target),
        place_start=place_start,
        place_end=place_end,
    )


def local_time(moment: datetime, tz: str, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """`moment` shown as wall-clock time in zone `tz`."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(zone(tz)).strftime(fmt)


def window_opening(
    moment: datetime, tz: str, opens: time, closes: time, weekdays: frozenset[int]
) -> datetime | None:
    """None if `moment` is inside the send window in zone `tz`; else when it next opens (UTC).

    The window opens at `opens` local time on each of `weekdays` (0 = Monday) and
    closes at `closes`, the next day if `closes` is not after `opens` (equal: a
    whole day). Wall-clock times are placed on each day by zoneinfo, so a window
    keeps its local hours across daylight-saving changes: the same 09:00 in
    London is 09:00 UTC in January and 08:00 UTC in July. All comparisons are in
    UTC (two datetimes of one zone would compare by wall clock, which a DST
    fold makes ambiguous).
    """
    place = zone(tz)
    now = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    today = now.astimezone(place).date()
    # Yesterday's window may still be open past midnight; then up to a week ahead.
    for offset in range(-1, 9):
        day = today + timedelta(days=offset)
        if day.weekday() not in weekdays:
            continue
        start = datetime.combine(day, opens, tzinfo=place).astimezone(UTC)
        end_day = day if closes > opens else day + timedelta(days=1)
        end = datetime.combine(end_day, closes, tzinfo=place).astimezone(UTC)
        if start <= now < end:
            return None
        if start > now:
            return start
    raise ValueError("a send window needs at least one weekday")  # config.py ensures one


def _parse_hours(hours: str) -> tuple[time, time]:
    try:
        first, _, second = hours.replace("\N{EN DASH}", "-").partition("-")
        opens, closes = time.fromisoformat(first.strip()), time.fromisoformat(second.strip())
    except ValueError:
        raise ValueError(f"office hours must look like '09:00-18:00', not {hours!r}") from None
    if closes <= opens:
        raise ValueError(f"office hours {hours!r} close before they open")
    return opens, closes
