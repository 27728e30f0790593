# Sealer: `make demo` runs the main job end to end, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extra pytest arguments, e.g. `make test PYTEST_ARGS='-m "not lab_quality"'` skips the tests
# that need a strong lab backdoor (tests/lab_quality.py).
PYTEST_ARGS ?=

.PHONY: install test demo lint bench bench-quick reliability clean

install: $(STAMP)

# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
# open-clip-torch only supplies the CLIP BPE merges file; --no-deps keeps torchvision out.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[engine,test]'
	$(BIN)/pip install -q --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -p tests.lab_quality $(PYTEST_ARGS)

demo: install
	$(BIN)/python scripts/demo.py

# CPU benchmarks; results are appended to docs/benchmarks.md. Run them on an idle machine.
bench: install
	$(BIN)/python benchmarks/engine_step.py --models tiny,sd15scaled --batches 1,4,16 --steps 2 --warmup 1
	$(BIN)/python benchmarks/scaling.py --sizes lab,sd15scaled,sd15 --batch-models lab,tiny --batches 1,4,16 --steps 1 --warmup 1 --full-budget 300
	$(BIN)/python benchmarks/evaluation_cost.py --images 64 --lab-build test
	$(BIN)/python benchmarks/service.py --size-mb 1024 --jobs 5 --rps 100 --seconds 30

bench-quick: install
	$(BIN)/python benchmarks/engine_step.py --models tiny --batches 1,4 --steps 1 --warmup 1
	$(BIN)/python benchmarks/scaling.py --sizes lab --batch-models lab --batches 1,4,16 --steps 2 --warmup 1
	$(BIN)/python benchmarks/evaluation_cost.py --images 16 --inference-steps 10 --lab-build none

# Fault and load scenarios against Redis, PostgreSQL and S3 servers that it starts on loopback
# (the binaries `make test` needs). Figures and method: docs/reliability.md.
reliability: install
	$(BIN)/python -m reliability.run --results reliability-results.json

lint: install
	$(BIN)/python -m compileall -q api core worker migrations tests
	$(BIN)/hadolint docker/api.Dockerfile docker/worker.Dockerfile

clean:
	rm -rf $(VENV) .data demo-out .pytest_cache
