"""Server-sent events, parsed line by line (the service's stream of job events)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field

__all__ = ["Event", "SSEParser", "parse_lines", "aparse_lines"]


@dataclass
class Event:
    id: str | None
    type: str
    data: dict


@dataclass
class SSEParser:
    """Feed lines; complete events come out. `retry_ms` follows the server's `retry:`."""

    retry_ms: int | None = None
    _fields: dict = field(default_factory=dict)
    _data: list = field(default_factory=list)

    def feed(self, line: str) -> Event | None:
        if line == "":
            event = None
            if self._data:
                event = Event(self._fields.get("id"), self._fields.get("event", "message"),
                              json.loads("\n".join(self._data)))
            self._fields, self._data = {}, []
            return event
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        elif name in ("id", "event"):
            self._fields[name] = value
        return None


def parse_lines(lines: Iterable[str]) -> Iterator[Event]:
    parser = SSEParser()
    for line in lines:
        if (event := parser.feed(line)) is not None:
            yield event


async def aparse_lines(lines: AsyncIterator[str]) -> AsyncIterator[Event]:
    parser = SSEParser()
    async for line in lines:
        if (event := parser.feed(line)) is not None:
            yield event
