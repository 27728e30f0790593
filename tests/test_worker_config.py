"""The Celery configuration that the API and the worker share."""

import subprocess
import sys

from core.queue import RUN_JOB_TASK, broker_transport_options, make_celery
from core.settings import Settings
from tests.servers import REPO_ROOT


def test_delivery_settings(tmp_path):
    app = make_celery(Settings(data_dir=tmp_path))

    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.worker_concurrency == 1


def test_redis_transport_options(tmp_path):
    settings = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6390/0", broker_visibility_timeout_s=42)

    options = broker_transport_options(settings)

    assert options["visibility_timeout"] == 42
    assert options["unacked_restore_interval"] == 1
    assert options["unacked_restore_throttle"] == 1


def test_sqlalchemy_transport_gets_no_options(tmp_path):
    # kombu's SQLAlchemy transport passes its options to create_engine, which rejects them.
    assert broker_transport_options(Settings(data_dir=tmp_path)) == {}


def test_worker_registers_task_by_name():
    from worker.celery_app import app

    app.loader.import_default_modules()

    assert RUN_JOB_TASK in app.tasks
    assert app.tasks[RUN_JOB_TASK].acks_late is True


def test_api_imports_without_torch():
    code = "import sys, api.main, core.client, core.service_cli; sys.exit(1 if 'torch' in sys.modules else 0)"

    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
