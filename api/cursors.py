"""Cursor pagination of lists: a page of ``limit`` items, and when more follow, a
``Link: <...>; rel="next"`` header (RFC 8288) whose URL carries an opaque cursor, so the body
stays a plain list."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Protocol, TypeVar

from fastapi import Depends, Query, Request, Response

from api.problems import Problem

T = TypeVar("T")


class Timed(Protocol):
    id: str
    created_at: datetime


Limit = Annotated[int, Query(ge=1, le=200, description="Items per page")]
Cursor = Annotated[
    str | None, Query(max_length=400, description="From the previous page's Link header")
]


def encode(*values: str) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def decode(cursor: str, size: int) -> list[str]:
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        values = None
    if not (
        isinstance(values, list) and len(values) == size and all(isinstance(v, str) for v in values)
    ):
        raise Problem(400, "invalid cursor: pass the one from a Link header as it is")
    return values


def decode_moment(cursor: str) -> tuple[datetime, str]:
    """A (created_at, id) cursor: rows ordered by time, ties broken by id."""
    created, row_id = decode(cursor, 2)
    try:
        moment = datetime.fromisoformat(created)
    except ValueError:
        moment = None
    if moment is None or moment.utcoffset() is None:
        raise Problem(400, "invalid cursor: pass the one from a Link header as it is")
    return moment, row_id


def moment(row: Timed) -> tuple[str, str]:
    return row.created_at.isoformat(), row.id


@dataclass
class Paging:
    """A list route's page: query ``fetch`` rows past the cursor, answer ``take(rows)``."""

    request: Request
    response: Response
    limit: int
    cursor: str | None

    @property
    def fetch(self) -> int:
        return self.limit + 1  # one more tells whether a next page exists

    def take(self, rows: Sequence[T], position: Callable[[T], tuple[str, ...]]) -> list[T]:
        """The first ``limit`` rows, and a Link to the page after them if there is one."""
        if len(rows) <= self.limit:
            return list(rows)
        cursor = encode(*position(rows[self.limit - 1]))
        url = self.request.url.include_query_params(limit=self.limit, cursor=cursor)
        self.response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
        return list(rows[: self.limit])


def paging(
    request: Request, response: Response, limit: Limit = 50, cursor: Cursor = None
) -> Paging:
    return Paging(request, response, limit, cursor)


PagingDep = Annotated[Paging, Depends(paging)]
