# Two commands to know: `make run` (the whole pipeline) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# The install compiles no bytecode ($(INSTALLED) says why): Python writes it as the pipeline first
# imports each module, also where an image sets PYTHONDONTWRITEBYTECODE, which would otherwise have every
# stage's process compile TensorFlow's modules anew.
unexport PYTHONDONTWRITEBYTECODE
# Without a GPU, TensorFlow's CPU build (requirements.lock); with an NVIDIA GPU (nvidia-smi lists one,
# or GPU=1), its CUDA build, CUDA libraries and NVML (requirements-gpu.lock). GPU=0 forces the CPU lock.
GPU ?= $(shell nvidia-smi --list-gpus >/dev/null 2>&1 && echo 1 || echo 0)
LOCK := $(if $(filter 1,$(GPU)),requirements-gpu.lock,requirements.lock)
# What running needs (`make run` and the other commands), then what tests, lint and docs add
# (requirements-dev.lock): targets that need the latter depend on $(DEV_INSTALLED).
INSTALLED := $(VENV)/.installed
DEV_INSTALLED := $(VENV)/.installed-dev
# Loopback only, unless you say otherwise: the UI has no authentication.
HOST ?= 127.0.0.1
PORT ?= 5000
# make serve: PORT when given, else 5001, so that the UI and the model server can run side by side.
SERVE_PORT := $(if $(filter command line environment,$(origin PORT)),$(PORT),5001)
# The commands' options come from make's command line: `make sweep SEEDS=3` runs `commands.sweep --seeds 3`.
# Only from the command line: an exported MODEL or FORCE in the shell changes nothing. A variable left
# unset passes nothing, so each default lives once, in the command (`python -m commands.<name> --help`);
# FORCE=1 (or yes, true) forces, FORCE=0 does not.
given = $(if $(filter command line,$(origin $(1))),$($(1)))
option = $(if $(call given,$(1)),$(2) '$(call given,$(1))')
flag = $(if $(filter 1 yes true,$(call given,$(1))),$(2))

.PHONY: another-lock help run warm cold test test-fast lint docs docs-serve params reset ui server serve promote sweep tune runs compare reproduce push pull bench numerics lock clean

## help: this list
help:
	@sed -n 's/^## //p' $(MAKEFILE_LIST) | sed 's/$$(HOST)/$(HOST)/g; s/$$(PORT)/$(PORT)/g; s/$$(SERVE_PORT)/$(SERVE_PORT)/g'

## run: the whole pipeline (`dvc repro`: conf/ composed into params.yaml when it changed, then the five stages);
##   OVERRIDES="key=value ..." composes conf/ with them first, as `make params` does
# The checkout is checked first (composing checks it too), for the one-line refusal: a bare `dvc repro`
# beside a running one stops at DVC's stage lock, with DVC's message.
run: $(INSTALLED)
	python -m pipeline.config $(if $(OVERRIDES),$(OVERRIDES),--check-free)
	dvc repro

## warm: start the warm process now and wait until it is ready (stages start one themselves unless
##   PIPELINE_WARM=0: docs/warm.md); it stops after IDLE minutes without a stage (default 30), or with `make cold`
warm: $(INSTALLED)
	python -m commands.warm start $(call option,IDLE,--idle-minutes)

## cold: stop `make warm`'s process (stages it is running finish)
cold: $(INSTALLED)
	python -m commands.warm stop

# Tests run in TEST_WORKERS processes (pytest-xdist; auto: one per core), a module's tests in one of
# them, so that a module's shared project is built once. TEST_WORKERS=0: one process, in order.
TEST_WORKERS ?= auto
PYTEST := pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope)

## test: the test suite (real DVC, Hydra, MLflow and TensorFlow on tiny data; TEST_WORKERS=auto)
test: $(DEV_INSTALLED)
	$(PYTEST) $(PYTEST_ARGS)

## test-fast: the tests that train nothing end to end (schema, parsers, error lines, CLI checks)
test-fast: $(DEV_INSTALLED)
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

## lint: ruff check and ruff format --check (rules in pyproject.toml; `ruff format .` fixes the layout)
lint: $(DEV_INSTALLED)
	ruff check .
	ruff format --check .

# NO_MKDOCS_2_WARNING: Material for MkDocs prints a banner about its successor on every build.
MKDOCS := NO_MKDOCS_2_WARNING=1 mkdocs

## docs: the documentation site (docs/, mkdocs.yml), built strictly into site/: a broken link or a page
##   missing from the nav fails
docs: $(DEV_INSTALLED)
	$(MKDOCS) build --strict --site-dir site

## docs-serve: the documentation site on http://127.0.0.1:8000, rebuilt on every edit
docs-serve: $(DEV_INSTALLED)
	$(MKDOCS) serve --strict --dev-addr 127.0.0.1:8000

## params: compose conf/ (plus OVERRIDES="key=value ...") into params.yaml
params: $(INSTALLED)
	python -m pipeline.config $(OVERRIDES)

## reset: back to the committed configuration after overrides, experiments or mistakes: the committed
##   params.yaml and dvc.lock, and the outputs they name from DVC's cache (conf/, the code, DVC's
##   experiments and the MLflow runs stay)
reset: $(INSTALLED)
	python -m pipeline.config --reset

## ui: the MLflow UI over the project's store, on http://$(HOST):$(PORT); prints the link once it answers
# (MLflow's usage events off unless MLFLOW_DISABLE_TELEMETRY=false, as pipeline/runtime.py says why).
# The registry store is named so that MLflow does not print that it defaulted to the tracking store.
UI_STORE = $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}
ui: $(INSTALLED)
	@MLFLOW_DISABLE_TELEMETRY=$${MLFLOW_DISABLE_TELEMETRY:-true} python -m pipeline.tracking ui --host $(HOST) --port $(PORT) \
		-- mlflow ui --backend-store-uri "$(UI_STORE)" --registry-store-uri "$(UI_STORE)" \
		--default-artifact-root "$(CURDIR)/mlartifacts" --host $(HOST) --port $(PORT) $(UI_ARGS)

## server: a team MLflow server with authentication: PostgreSQL store, S3 artifacts proxied by the server
##   BACKEND_STORE_URI=postgresql://user@host:port/db ARTIFACTS_DESTINATION=s3://bucket/path
##   MLFLOW_AUTH_ADMIN_PASSWORD (or MLFLOW_AUTH_ADMIN_PASSWORD_FILE outside the repository);
##   SERVER_NAME=<the name clients use> when HOST is not loopback; AUTH_DATABASE_URI (users and
##   permissions; default ~/.mlflow/mnist-basic-auth.db); AUTH=0 (refused unless HOST is loopback).
##   S3 credentials from AWS_* and MLFLOW_S3_ENDPOINT_URL for an S3-compatible service.
##   Database password: PGPASSWORD or ~/.pgpass (a URI holding one is refused: ps shows it). UI_ARGS:
##   --workers, --static-prefix, --expose-prometheus only.
server: $(INSTALLED)
	python -m commands.tracking_server --host $(HOST) --port $(PORT) $(call option,BACKEND_STORE_URI,--backend-store-uri) \
		$(call option,ARTIFACTS_DESTINATION,--artifacts-destination) $(call option,SERVER_NAME,--server-name) \
		$(call option,AUTH_DATABASE_URI,--auth-database-uri) $(if $(filter 0 no false,$(call given,AUTH)),--no-auth) \
		$(if $(call given,UI_ARGS),--mlflow-args='$(call given,UI_ARGS)')

## serve: MLflow's model server on http://$(HOST):$(SERVE_PORT) (PORT=, default 5001) for RUN=<run id>
##   or MODEL=models:/mnist-classifier@champion; default: the latest training run
serve: $(INSTALLED)
	python -m commands.model_server serve --host $(HOST) --port $(SERVE_PORT) $(call option,RUN,--run) $(call option,MODEL,--model)

## promote: register RUN=<run id>'s model as mnist-classifier and move its @champion alias to it
promote: $(INSTALLED)
	python -m commands.model_server promote $(call option,RUN,--run)

## sweep: presets of conf/experiment/ as queued DVC experiments: SETTINGS= (default: the article's four;
##   also tuned, cnn), SEEDS=1, JOBS=1; DEVICES=0,1 and FORCE=1 optional
sweep: $(INSTALLED)
	python -m commands.sweep $(SETTINGS) $(call option,SEEDS,--seeds) $(call option,JOBS,--jobs) \
		$(call option,DEVICES,--devices) $(call flag,FORCE,--force)

## tune: an Optuna study (TPE) over conf/search/mlp.yaml (SPACE=): TRIALS=20 finished trials, each a
##   DVC experiment and an MLflow run, chosen on validation accuracy, one at a time; then the best
##   setting is written to conf/experiment/tuned.yaml and re-run with CONFIRM_SEEDS=3 seeds for `make compare`
##   (a study of fewer trials than the one that wrote it replaces it only with FORCE=1).
##   Run again to continue the study. STUDY_STORAGE=postgresql://... (default sqlite:///optuna.db)
##   lets workers on several machines join one study; STUDY= names it (default: the space's name).
tune: $(INSTALLED)
	python -m commands.tune $(call option,SPACE,--space) $(call option,TRIALS,--trials) \
		$(call option,STUDY_STORAGE,--storage) $(call option,STUDY,--study) $(call option,CONFIRM_SEEDS,--confirm-seeds) \
		$(call flag,FORCE,--force)

## runs: the DVC experiments in a terminal: test accuracy (best first) and every param that differs among
##   them, as wide as that takes (COLUMNS=100 caps it: columns past it show as …). ALL=1: every commit's
# --only-changed drops the params that every row shares (and the State column when no experiment came from
# DVC's queue: it tells a failed one, shown with its parent's metrics, from one that ran); --drop the stage outputs, the other metrics and
# dvc's bookkeeping; --keep holds test_accuracy even when every row has the same. Without a pager, dvc cuts
# the table at COLUMNS (80 when unset, and shells do not export theirs): the params that differ would go.
RUNS_DROP := ^(Created|Executor|[a-z0-9_]+|.*/.*|.*\.(lock|py|yaml|yml|json|csv|txt)|(download|evaluate|error_analysis)\..*)$$
runs: $(INSTALLED)
	@COLUMNS=$${COLUMNS:-1024} dvc exp show --no-pager --only-changed --drop '$(RUNS_DROP)' --keep '^test_accuracy$$' \
		--sort-by test_accuracy --sort-order desc --precision 4 $(call flag,ALL,--all-commits)

## compare: regenerate reports/comparison.{md,csv,png} from the tracked MLflow runs, each setting
##   against the default with a 95% interval and a verdict (refuses to replace them with a table of fewer runs
##   unless FORCE=1). PLAN=0.2: the seeds each setting needs for an interval of ±0.2 points, writes nothing
compare: $(INSTALLED)
	python -m commands.compare $(call flag,FORCE,--force) $(call option,PLAN,--plan)

## reproduce: recompute a result and compare (REV=HEAD, a commit or tag, or RUN=<mlflow run id>; TOLERANCE=)
reproduce: $(INSTALLED)
	python -m commands.reproduce $(call option,REV,--rev) $(call option,RUN,--run) $(call option,TOLERANCE,--tolerance)

## push / pull: data and models to / from the DVC remote (default: ./dvc-storage)
push: $(INSTALLED)
	dvc push
pull: $(INSTALLED)
	dvc pull

## bench: the pipeline's cost vs the bare Keras script, side by side, and the CNN preset over 3 seeds
##   (BENCH_ARGS=--no-cnn skips it); writes bench/results.md and docs/performance.md's table. Long: every
##   measurement is repeated (--repeats), and the CNN trains once per seed. BENCH_ARGS="--install-only
##   --install-baseline <rev>": the install alone (fresh installs, venv size after `make run`, import time)
bench: $(INSTALLED)
	python bench/bench.py $(BENCH_ARGS)

## numerics: the default MLP under each numeric environment this machine can emulate (oneDNN on/off,
##   its ISA capped, thread counts); writes bench/numeric_environments.md. One full training per environment.
numerics: $(INSTALLED)
	python bench/numeric_environments.py

## lock: re-resolve pyproject.toml into requirements.lock (CPU build), requirements-gpu.lock (CUDA build)
##   and requirements-dev.lock (tests, lint, docs), keeping the versions they pin unless UPGRADE=1 (pip's
##   --dry-run resolver: nothing downloaded); needs the network
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/python tools/lock.py $(call flag,UPGRADE,--upgrade) && rm -rf .lock-venv

# A venv holds exactly one lock: pip install -r adds and upgrades but never removes, so a lock that
# dropped a package, or the other TensorFlow build (both install the module `tensorflow`), would
# leave it behind. A changed runtime lock, or another one (the stamp names the venv's: GPU=1 after a
# CPU install), therefore rebuilds the venv from scratch.
# No --quiet: pip shows each package as it is downloaded and installed. --no-deps: the lock is the
# whole install, less what tools/lock.py leaves out as never imported (NEVER_IMPORTED). --no-compile:
# Python writes bytecode on first import, for the modules the pipeline imports only. The venv is then
# trimmed of what running never reads (docs/install.md, "What the install leaves out"): TensorFlow's
# C++ headers (for compiling custom ops) and the symbol tables of shared libraries (for debuggers;
# `strip` from binutils, skipped where missing; vendored *.libs are left as auditwheel patched them).
$(INSTALLED): $(LOCK) $(if $(filter $(LOCK),$(shell cat $(INSTALLED) 2>/dev/null)),,another-lock)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	@echo "installing .venv from $(LOCK)"
	$(VENV)/bin/pip install --no-compile --no-deps -r $(LOCK)
	rm -rf $(VENV)/lib/python3*/site-packages/tensorflow/include
	@if command -v strip >/dev/null; then echo "stripping symbol tables from .venv's shared libraries"; \
		find $(VENV)/lib \( -name '*.so' -o -name '*.so.[0-9]*' \) -type f -not -path '*.libs/*' \
			-exec strip --strip-unneeded {} +; \
	else echo "strip (binutils) not found: .venv keeps its shared libraries' symbol tables (0.4 GB more)"; fi
	echo $(LOCK) > $@

$(DEV_INSTALLED): $(INSTALLED) requirements-dev.lock
	@echo "adding requirements-dev.lock to .venv (tests, lint, docs)"
	$(VENV)/bin/pip install --no-compile --no-deps -r $(LOCK) -r requirements-dev.lock
	touch $@

another-lock:

## clean: remove the environment (outputs stay in the DVC cache)
clean:
	rm -rf $(VENV)
