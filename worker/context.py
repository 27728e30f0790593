"""Per-process worker state: settings, database engine, object store and the worker id.

Built on first use in each process. A Celery pool child must not reuse connections
inherited from its parent, so `reset_context()` runs after every fork.
"""

import os
import socket
import uuid
from dataclasses import dataclass
from functools import cached_property

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from core import db
from core.settings import Settings, get_settings
from core.storage import ObjectStore, make_store


@dataclass
class WorkerContext:
    settings: Settings
    worker_id: str
    pid: int

    @cached_property
    def engine(self) -> Engine:
        return db.make_engine(self.settings.resolved_database_url)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return db.session_factory(self.engine)

    @cached_property
    def store(self) -> ObjectStore:
        return make_store(self.settings)

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()


def make_worker_id(settings: Settings) -> str:
    """Return a lease owner name unique to this process: `<name or host>:<pid>:<random>`."""
    name = settings.worker_id or socket.gethostname()
    return f"{name}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


_context: WorkerContext | None = None


def get_context() -> WorkerContext:
    global _context
    if _context is None or _context.pid != os.getpid():
        settings = get_settings()
        _context = WorkerContext(settings=settings, worker_id=make_worker_id(settings), pid=os.getpid())
    return _context


def reset_context() -> None:
    """Forget the inherited context (without closing the parent's connections)."""
    global _context
    _context = None
