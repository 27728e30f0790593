#!/bin/sh
# Entrypoint of both Sealer images: empty the Prometheus multi-process folder, then run
# the command. Metric files left by an earlier container start would otherwise be added
# to this one's counters.
set -eu

if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    rm -rf "${PROMETHEUS_MULTIPROC_DIR:?}"
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
fi

exec "$@"
