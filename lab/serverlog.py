"""One log line, not a traceback, for a request an aiohttp server's parser refused.

aiohttp logs such a request with the exception attached; it is the client's mistake
(a bad header byte, an over-long line), so the lab says it once. A crash in a handler
keeps its traceback: that one is ours.
"""
from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError


class _OneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = f"{record.getMessage()}: {exc.code} {' '.join(str(exc.message).split())[:200]}"
            record.args = ()
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def server_logger(name: str) -> logging.Logger:
    """The logger to hand `web.AppRunner(..., logger=...)`."""
    log = logging.getLogger(name)
    if not any(isinstance(f, _OneLine) for f in log.filters):
        log.addFilter(_OneLine())
    return log
