"""The runs filter (from a page's query string or a bulk form), and the errors a page
answers with an HTTP status."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

from saga._model import RunStatus

Fields = Mapping[str, Sequence[str]]


class PageError(Exception):
    """A request the dashboard answers with ``status`` and a message for the operator."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def field(fields: Fields, name: str) -> str:
    """The first value of a field, stripped ("" when absent)."""
    values = fields.get(name) or [""]
    return values[0].strip()


def run_id(text: str) -> uuid.UUID:
    """A run id from a URL or a form; 400 when it is not a UUID."""
    try:
        return uuid.UUID(text)
    except ValueError:
        raise PageError(400, f"not a run id (a UUID): {text[:100]!r}") from None


def _time(name: str, text: str) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise PageError(
            400, f"{name} must be a date and time such as 2024-05-01T13:30, got {text[:60]!r}"
        ) from None
    try:  # the dashboard shows and reads UTC: an offset given is converted
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+14:00 is before the first day
        raise PageError(400, f"{name} is out of range: {text[:60]!r}") from None
    return value


@dataclass(frozen=True, slots=True)
class RunFilters:
    """What the runs page lists (and a bulk action acts on)."""

    saga: str | None = None
    statuses: tuple[str, ...] = ()
    key: str | None = None
    after: datetime | None = None  # created after
    before: datetime | None = None  # created before

    def pairs(self) -> list[tuple[str, str]]:
        """The filter as query-string pairs (to link pages and fill hidden fields)."""
        out: list[tuple[str, str]] = []
        if self.saga:
            out.append(("saga", self.saga))
        out += [("status", s) for s in self.statuses]
        if self.key:
            out.append(("key", self.key))
        if self.after:
            out.append(("after", self.after.isoformat()))
        if self.before:
            out.append(("before", self.before.isoformat()))
        return out

    def query(self, **extra: str) -> str:
        return urlencode(self.pairs() + list(extra.items()))

    @property
    def active(self) -> bool:
        return bool(self.pairs())

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments of list_runs and the bulk functions (the times as given:
        never turned into ages by this process's clock, which the database's is not)."""
        return {
            "saga": self.saga,
            "status": list(self.statuses) or None,
            "key": self.key,
            "newer_than": self.after,
            "older_than": self.before,
        }


def form_filters(form: Fields) -> RunFilters:
    """The filter a form carries in its hidden ``filter`` field (see runs.html): one
    query string, whose line breaks a browser cannot turn into CRLF as it does with a
    field's text. A form without it gives its own fields."""
    carried = form.get("filter")
    if not carried:
        return parse_filters(form)
    fields: dict[str, list[str]] = {}
    for name, value in parse_qsl(carried[0], keep_blank_values=True):
        fields.setdefault(name, []).append(value)
    return parse_filters(fields)


def parse_filters(fields: Fields) -> RunFilters:
    """The filter a query string or form gives; 400 (PageError) for a malformed one."""
    statuses: list[str] = []
    for value in fields.get("status", ()):
        if not value:
            continue
        try:
            statuses.append(RunStatus(value).value)
        except ValueError:
            known = ", ".join(s.value for s in RunStatus)
            raise PageError(
                400, f"unknown status {value[:60]!r}; the statuses are: {known}"
            ) from None
    # A key is any text, kept as given: "acct-7 " and "acct-7" are two business ids.
    saga, key = field(fields, "saga"), (fields.get("key") or [""])[0]
    for name, text in (("saga", saga), ("key", key)):
        if "\x00" in text or len(text) > 512:
            raise PageError(400, f"the {name} filter must be at most 512 characters, no NUL")
    after = _time("created after", field(fields, "after"))
    before = _time("created before", field(fields, "before"))
    if after and before and after >= before:
        raise PageError(400, "created after must be earlier than created before")
    return RunFilters(
        saga=saga or None,
        statuses=tuple(sorted(set(statuses))),
        key=key or None,
        after=after,
        before=before,
    )
