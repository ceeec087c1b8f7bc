"""Server-sent events (the service's stream of job events), parsed line by line.

The parser is fed lines rather than bytes so that the sync and the async client can share
it: each reads lines from its own kind of httpx response.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

__all__ = ["Event", "SSEParser"]


class Event(NamedTuple):
    """One job event. A tuple so that `for event_id, kind, data in c.events(job_id)` works;
    `data` is the progress dict for `progress`, the job's view (a dict) otherwise."""

    id: str | None
    type: str
    data: Any


class SSEParser:
    """Feed it lines; a complete event comes out at each blank line.

    Comments (`: keep-alive`) are dropped. `retry_ms` keeps the server's `retry:` (how long
    it asks clients to wait before reconnecting)."""

    def __init__(self) -> None:
        self.retry_ms: int | None = None
        self._id: str | None = None
        self._type: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        line = line.rstrip("\r\n")
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None  # unknown fields are ignored, as the SSE specification asks

    def _dispatch(self) -> Event | None:
        if not self._data:  # an event without data is not dispatched (the specification)
            self._type = None
            return None
        text = "\n".join(self._data)
        try:
            data: Any = json.loads(text)
        except ValueError:
            data = text
        event = Event(self._id, self._type or "message", data)
        self._type, self._data = None, []
        return event
