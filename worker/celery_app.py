"""The worker's Celery app: `celery -A worker.celery_app worker --concurrency 1`.

The app's configuration comes from core.queue (acks late, reject on worker lost, prefetch
1, one process), the same as the API's. Every pool process runs a reaper thread that
re-queues jobs whose worker died; the main process serves Prometheus metrics when
SEALER_WORKER_METRICS_PORT is set.
"""

import logging

from celery import signals

from core.queue import make_celery
from core.settings import get_settings

logger = logging.getLogger(__name__)

app = make_celery(get_settings())
app.conf.imports = ("worker.tasks",)

_reaper = None


def _configure_logging() -> None:
    try:
        from core.logging_setup import configure_logging
    except ImportError:
        logging.basicConfig(level=logging.INFO)
        return
    configure_logging(get_settings())


@signals.setup_logging.connect
def _setup_logging(**kwargs) -> None:
    # Connecting this signal stops Celery from installing its own handlers.
    _configure_logging()


@signals.worker_init.connect
def _start_metrics(**kwargs) -> None:
    settings = get_settings()
    settings.resolved_scratch_dir.mkdir(parents=True, exist_ok=True)
    try:
        from core.metrics import start_worker_metrics_server
    except ImportError:
        return
    start_worker_metrics_server(settings.worker_metrics_port)


@signals.worker_process_init.connect
def _start_reaper(**kwargs) -> None:
    global _reaper
    from worker.context import get_context, reset_context
    from worker.reaper import Reaper

    reset_context()
    context = get_context()
    _reaper = Reaper(context, context.settings.reaper_interval_s).start()
    logger.info("worker process %s ready", context.worker_id)


@signals.worker_process_shutdown.connect
def _stop_reaper(**kwargs) -> None:
    if _reaper is not None:
        _reaper.stop()


@signals.worker_ready.connect
def _announce_ready(sender=None, **kwargs) -> None:
    settings = get_settings()
    logger.info(
        "worker ready: database %s, broker %s, store %s",
        settings.resolved_database_url.split("@")[-1],
        settings.resolved_broker_url.split("@")[-1],
        settings.storage,
    )
