"""Retry the worker's object-store and database calls through an outage, with exponential backoff.

A job runs for hours, so a store or database that is down for a minute must not fail it.
Only errors that a retry can cure are retried: lost connections, timeouts, 5xx responses
and throttling. Anything else is raised at once.
"""

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from core.errors import StoreUnavailable
from core.storage import is_transient_error

T = TypeVar("T")

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0


def is_transient_database_error(error: BaseException) -> bool:
    """True when the database connection failed (server restarting, network cut), not the statement."""
    if isinstance(error, (OperationalError, InterfaceError)):
        return True
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


def call_with_retries(
    operation: Callable[[], T],
    *,
    what: str,
    window_s: float,
    is_transient: Callable[[BaseException], bool],
    log: logging.LoggerAdapter | logging.Logger,
) -> T:
    """Call `operation` until it succeeds, retrying transient errors for up to `window_s` seconds.

    Waits double from 1 s up to 30 s, with 20% jitter so that workers do not retry in step.
    The last transient error is raised once the window is spent.
    """
    deadline = time.monotonic() + window_s
    backoff = FIRST_BACKOFF_S
    failures = 0
    while True:
        try:
            result = operation()
        except Exception as error:
            remaining = deadline - time.monotonic()
            if not is_transient(error) or remaining <= 0:
                if failures:
                    log.error("%s failed %d times over %.0f s; giving up: %s", what, failures + 1, window_s, error)
                raise
            failures += 1
            wait = min(backoff * random.uniform(0.8, 1.2), remaining)
            log.warning("%s failed (%s: %s); retrying in %.1f s, for up to %.0f s more", what, type(error).__name__, error, wait, remaining)
            time.sleep(wait)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            continue
        if failures:
            log.info("%s succeeded after %d failed tries", what, failures)
        return result


def call_store(operation: Callable[[], T], *, what: str, window_s: float, log: logging.LoggerAdapter | logging.Logger) -> T:
    """Call an object-store operation with retries; raise StoreUnavailable when the window is spent."""
    try:
        return call_with_retries(operation, what=what, window_s=window_s, is_transient=is_transient_error, log=log)
    except Exception as error:
        if not is_transient_error(error):
            raise
        raise StoreUnavailable(
            f"the object store was unreachable for over {window_s:.0f} s while {what} ({type(error).__name__}: {error}); "
            "submit the job again once the store is back, or ask the operator to raise SEALER_STORE_RETRY_WINDOW_S"
        ) from error
