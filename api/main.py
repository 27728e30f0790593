"""The FastAPI app. `uvicorn api.main:app` serves it; tests build their own with `create_app(settings)`.

Startup connects to the database and refuses to serve when its schema is not at the
latest Alembic migration. The API never imports torch.
"""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.deps import Services
from api.errors import install_error_handlers
from api.routes import health, jobs, uploads
from core import db
from core.queue import make_celery
from core.scratch import remove_orphans
from core.settings import Settings, get_settings
from core.storage import S3Store, make_store

logger = logging.getLogger(__name__)


def build_services(settings: Settings) -> Services:
    """Connect to the database (checking its schema), the store and the broker."""
    engine = db.make_engine(settings.resolved_database_url)
    try:
        db.check_schema(engine)
    except db.SchemaOutOfDate:
        engine.dispose()
        raise
    store = make_store(settings)
    if isinstance(store, S3Store):
        try:
            store.ensure_bucket()
        except Exception as error:  # /readyz reports the store until it is reachable.
            logger.warning("could not check or create bucket %s: %s", settings.s3_bucket, error)
    return Services(
        settings=settings,
        engine=engine,
        sessions=db.session_factory(engine),
        store=store,
        celery=make_celery(settings),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; its services connect when it starts (`settings` default: the environment)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved = settings or get_settings()
        if settings is None:  # A real server process; tests pass settings and keep pytest's logging.
            _configure_process_logging()
        try:
            services = build_services(resolved)
        except db.SchemaOutOfDate as error:
            logger.error("refusing to start: %s", error)
            raise
        app.state.services = services
        remove_orphans(resolved.resolved_scratch_dir / "api-spool")
        _register_job_counts(services)
        logger.info(
            "API ready: database %s, store %s, broker %s",
            services.engine.url.render_as_string(hide_password=True),
            resolved.storage,
            services.celery.conf.broker_url.split("@")[-1],
        )
        try:
            yield
        finally:
            services.engine.dispose()

    app = FastAPI(
        title="Sealer",
        version="0.1.0",
        description="Remove textual backdoors from text-to-image diffusion models. "
        "Every route except /healthz, /readyz and /metrics needs `Authorization: Bearer <API key>`.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(uploads.router)
    _install_metrics(app)
    return app


def _install_metrics(app: FastAPI) -> None:
    try:
        from api.metrics import install_metrics
    except ImportError:  # Metrics are optional while the module is absent.
        return
    install_metrics(app)


def _register_job_counts(services: Services) -> None:
    try:
        from api.metrics import database_job_counts
        from core.metrics import register_job_counts
    except ImportError:
        return
    register_job_counts(database_job_counts(services.engine))


def _configure_process_logging() -> None:
    try:
        from core.logging_setup import configure_logging
    except ImportError:
        logging.basicConfig(level=logging.INFO)
        return
    configure_logging(get_settings())


# Building the app has no side effects; the database and store connect at startup.
app = create_app()
