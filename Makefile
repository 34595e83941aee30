# Two entry points (see README):
#   make train   set up .venv (pinned deps, extension built) and run the main job
#   make test    same setup, then the whole test suite
# and make serve, after make train: the main job's model behind an HTTP endpoint.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.ext-built
TORCHREC := torchrec==1.9.2
EXT_SOURCES := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \)) setup.py pyproject.toml

.PHONY: setup train serve test bench gpu-check
.DEFAULT_GOAL := setup

setup: $(BUILT)

$(DEPS): .ci/requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r .ci/requirements.txt
	$(PY) -m pip install --quiet --no-deps $(TORCHREC)
	touch $@

# --no-build-isolation: build against the pinned torch, not a fresh download. Then the C++ runner
# (recis-serve, csrc/serving/) and its lookup library, linked against the same libtorch.
$(BUILT): $(DEPS) $(EXT_SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -m recis_torchrec.inference.runner build
	touch $@

# The main job: 2-rank torchrun training with our sharder, from a TOML config (see examples/).
# make train DATA=day_0.tsv EVAL=day_1.tsv trains the same model on Criteo files.
CONFIG ?= examples/synthetic_dlrm.toml
RUN    ?= runs/main-$(shell date +%Y%m%d-%H%M%S)
NPROC  ?= 2
train: setup
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m recis_torchrec.train --config $(CONFIG) \
		--output-dir $(RUN) $(if $(DATA),--data $(DATA)) $(if $(EVAL),--eval-data $(EVAL))

# After make train: exports the newest run's last checkpoint as version 1 of a model directory
# ($(SERVE_RUN)/model) and serves it on localhost:$(PORT) (python -m recis_torchrec.serve; see README).
# Newer versions and deltas copied into that directory are picked up while it serves.
SERVE_RUN ?= $(lastword $(sort $(wildcard runs/main-*)))
PORT      ?= 8080
serve: setup
	@test -n "$(SERVE_RUN)" || { echo "make serve: no runs/main-* here: run make train first" >&2; exit 2; }
	test -d $(SERVE_RUN)/model/1 || $(PY) -m recis_torchrec.inference export $(SERVE_RUN)/checkpoints $(SERVE_RUN)/model/1
	$(PY) -m recis_torchrec.serve $(SERVE_RUN)/model --port $(PORT)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

bench: setup
	$(PY) -m benchmarks $(BENCH_ARGS)

# On a machine with a GPU: rebuild the extension with the CUDA tables and kernels (RECIS_CUDA=1),
# run every test marked `cuda` (each test's CUDA case from devices(), the GPU-only tests and the NCCL
# sharded tests: selected by marker, not by name), then compute-sanitizer's memcheck and racecheck on
# the CUDA table tests (a small subset: the sanitizer slows a run 10-100x), then the GPU benchmarks.
# PY may point at another interpreter that has torch (CUDA), torchrec and fbgemm-gpu-cpu.
SANITIZE ?= tests/tables/test_tables_on_devices.py
gpu-check:
	RECIS_CUDA=1 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -m pytest -q -rs tests -m cuda
	compute-sanitizer --tool memcheck --error-exitcode 1 $(PY) -m pytest -q -x $(SANITIZE) -m cuda
	compute-sanitizer --tool racecheck --error-exitcode 1 $(PY) -m pytest -q -x $(SANITIZE) -m cuda
	$(PY) -m benchmarks --quick --only gpu

