# chextrain: `make demo` runs the main job on generated demo data; `make test` runs the test suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo

.PHONY: install demo test lint bench gpu-check clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch/torchvision are pinned to the releases this machine has on disk; a bigger box may
# install any release that satisfies pyproject.toml's lower bounds.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/chextrain demo --out $(DEMO_DIR)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

# Each benchmark prints its figures and ratios measured side by side in one run (a few minutes
# in all); benchmarks/demo.py (make demo on a fresh clone) is separate: it takes ~12 minutes.
bench: install
	$(PY) benchmarks/catalog.py
	$(PY) benchmarks/images.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/cli_startup.py
	$(PY) benchmarks/study_parallel.py
	$(PY) benchmarks/photo_sim.py
	$(PY) benchmarks/rectify.py
	$(PY) benchmarks/feed.py
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/gpu.py

# On a machine with an NVIDIA GPU: a two-stage mini study on CUDA end to end (train, evaluate,
# OOD, bundle, predict, export, predict --runtime onnx); exits non-zero on any failure, and says
# why it skips where there is no CUDA. `python benchmarks/gpu.py` gives the GPU throughput figures.
gpu-check: install
	$(PY) scripts/gpu_check.py

clean:
	rm -rf $(VENV) $(DEMO_DIR)
