#!/bin/sh
# Serve the API with uvicorn. The process count is SEALER_API_WORKERS, read through
# Sealer's settings so that an invalid value stops the container with the settings error.
set -eu

workers="$(python -c 'from core.settings import get_settings; print(get_settings().api_workers)')"

exec uvicorn api.main:app --host 0.0.0.0 --port 8000 --workers "$workers"
