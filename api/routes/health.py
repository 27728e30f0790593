"""`/healthz` (the process is up) and `/readyz` (database, broker and store reachable)."""

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from api.deps import ServicesDep
from core.db import check_schema
from core.queue import check_broker

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the API process answers")
def healthz() -> dict:
    return {"status": "ok"}


def _check_database(services) -> None:
    with services.engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    check_schema(services.engine)


def _check_broker(services) -> None:
    check_broker(services.celery, timeout_s=3.0)


def _check_store(services) -> None:
    services.store.check()


@router.get("/readyz", summary="Readiness: database, broker and object store are reachable")
async def readyz(services: ServicesDep) -> JSONResponse:
    checks = {}
    for name, check in (("database", _check_database), ("broker", _check_broker), ("store", _check_store)):
        try:
            await run_in_threadpool(check, services)
            checks[name] = "ok"
        except Exception as error:  # Any failure means "not ready"; the message says which part.
            logger.warning("readiness check %s failed: %s", name, error)
            checks[name] = f"failed: {type(error).__name__}: {error}"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503)
