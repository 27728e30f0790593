"""Errors that carry a stable code, the offending field and a message that names the fix."""


class SealerError(Exception):
    """Base error: `code` is machine-readable, `message` names the value and the fix."""

    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "field": self.field}


class InputError(SealerError):
    """The user's checkpoint or spec is unusable; the API answers 4xx, the worker fails the job."""

    code = "invalid_input"


class UnsupportedFormatError(InputError):
    """The checkpoint is in a format Sealer does not load (pickle, unknown layout)."""

    code = "unsupported_format"


class JobCancelled(SealerError):
    """The job was cancelled between two engine steps."""

    code = "cancelled"


class JobTimedOut(SealerError):
    """The job ran past its time limit."""

    code = "timed_out"


class StoreUnavailable(SealerError):
    """The object store stayed unreachable for longer than the worker's retry window."""

    code = "storage_unavailable"
