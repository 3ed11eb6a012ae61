"""One rooted exception hierarchy. Recoverable (retry later) and fatal (fix the input) are apart."""

from __future__ import annotations


class GristmillError(Exception):
    """Raised for every error gristmill itself reports; catch this to catch them all."""


class ConfigurationError(GristmillError, ValueError):
    """Raised when settings or a model registration are invalid; the message says how to fix it."""


class RedisUnavailable(GristmillError):
    """Raised when no Redis can be reached: neither GRISTMILL_REDIS_URL nor a running `gristmill up`."""


class SubmissionRejected(GristmillError):
    """Raised when a whole submission is refused before anything is enqueued (e.g. duplicate custom_ids)."""


class DuplicateCustomIds(SubmissionRejected):
    """Raised when two or more input lines share a custom_id; names them with their line numbers."""

    def __init__(self, duplicates: dict[str, list[int]], more: int = 0):
        self.duplicates = duplicates
        shown = "; ".join(f"{cid!r} on lines {', '.join(map(str, lines))}" for cid, lines in duplicates.items())
        extra = f" (and {more} more repeated lines)" if more else ""
        super().__init__(f"duplicate custom_id values: {shown}{extra}. Each line needs a unique custom_id.")


class BatchNotFound(GristmillError):
    """Raised when a batch id is unknown or its records have expired from Redis."""


class ModelNotFound(GristmillError):
    """Raised when a request names a model that is not registered."""


class EngineError(GristmillError):
    """Raised inside a worker when an engine fails; recoverable by splitting or retrying the batch."""


class ItemError(EngineError):
    """Raised for one item that cannot run (e.g. over-long prompt); carries an error code for its line."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)
