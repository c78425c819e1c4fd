"""A gateway in front of a real Label Studio, for tests: a ``FaultProxy`` that also caps the
tasks API's ``page_size`` (as Label Studio's ``TASK_API_PAGE_SIZE_MAX`` or an API gateway
would) and answers with its own clock in the ``Date`` header (as nginx does), skewed from
Label Studio's."""

from __future__ import annotations

import re
from datetime import timedelta
from email.utils import format_datetime, parsedate_to_datetime

from tests.faults.proxy import FaultProxy

_HEAD_END = b"\r\n\r\n"


class _CappedReader:
    """The client's side of the proxy, with the ``page_size`` of every tasks API request
    capped (as Label Studio's ``TASK_API_PAGE_SIZE_MAX`` or a gateway would)."""

    def __init__(self, reader, cap: int):
        self._reader, self._cap = reader, cap

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        data = await self._reader.readuntil(separator)
        if separator != _HEAD_END or not data.startswith(b"GET /api/tasks/?"):
            return data
        line, _, rest = data.partition(b"\r\n")
        line = re.sub(rb"([?&]page_size=)(\d+)",
                      lambda m: m[1] + str(min(int(m[2]), self._cap)).encode(), line)
        return line + b"\r\n" + rest

    def __getattr__(self, name: str):
        return getattr(self._reader, name)


class Gateway(FaultProxy):
    """A gateway in front of Label Studio: caps the tasks API's page size, and answers with its
    own clock in ``Date`` (``date_skew_s`` ahead of Label Studio's), as nginx does."""

    def __init__(self, host: str, port: int, *, page_cap: int = 0, date_skew_s: float = 0.0):
        super().__init__(host, port)
        self.page_cap, self.date_skew_s = page_cap, date_skew_s

    async def _serve(self, reader, writer) -> None:
        await super()._serve(_CappedReader(reader, self.page_cap) if self.page_cap else reader,
                             writer)

    async def _read_response(self, reader, method):
        msg = await FaultProxy._read_response(reader, method)
        if msg is not None and self.date_skew_s and "date" in msg.headers:
            skewed = parsedate_to_datetime(msg.headers["date"]) + timedelta(
                seconds=self.date_skew_s)
            msg.head = re.sub(rb"(?im)^date:[^\r\n]*", b"Date: " + format_datetime(
                skewed, usegmt=True).encode(), msg.head)
        return msg
