# Two commands set everything up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATASET ?= fashion-mnist
MODEL ?= cnn3x3
WORKDIR ?= runs/$(DATASET)-$(MODEL)
STEPS ?=
PYTEST_ARGS ?=

STEPS_FLAG := $(if $(STEPS),--steps $(STEPS),)
STAMP := $(VENV)/.installed

.PHONY: install data train train-multiworker eval-watch eval-once test lint clean predict export soak bench gpu-check demo-folder

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,cloud]'
	touch $(STAMP)

data: install
	$(BIN)/python -m common.data.fetch --dataset $(DATASET)

train: data
	$(BIN)/trainer --workdir $(WORKDIR) --dataset $(DATASET) --model $(MODEL) $(STEPS_FLAG)

# The same run as one multi-worker job of WORKERS local processes (tf.distribute, docs/distributed.md).
WORKERS ?= 2
train-multiworker: data
	$(BIN)/trainer --workers $(WORKERS) --workdir $(WORKDIR) --dataset $(DATASET) --model $(MODEL) $(STEPS_FLAG)

eval-watch: install
	$(BIN)/evaluator --workdir $(WORKDIR)

eval-once: install
	$(BIN)/evaluator --workdir $(WORKDIR) --once

# Tests make their own tiny data; the real dataset is fetched so that the `realdata` tests run too.
# Two pytest workers, a test file each at a time: the storms mostly wait on TensorFlow starting in a
# subprocess, so two files share the two cores well (13:03 serial against 10:39 in one measurement).
# The longest files go first, in tests/conftest.py's order (--no-loadscope-reorder keeps it), so that
# no long file starts last and runs alone at the end.
test: data
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check common trainer evaluator tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# Classify image files with the default run: make predict IMAGES="a.png b.jpg folder/"
IMAGES ?=
predict: install
	$(BIN)/predict --model $(WORKDIR) $(IMAGES)

export: install
	$(BIN)/evaluator export --workdir $(WORKDIR) --frozen

# 300 SIGKILLs of a real trainer, then 50 of a random worker of a 2-worker job, with an evaluator watching,
# then 20 of random evaluators of three sharing a workdir (each ends with one line of figures); then the long test variants (100 kills per bucket store, the quick bench, the transfer demo, GCS runs).
soak: data
	$(BIN)/python -m tests.fault.storm --kills 300
	$(BIN)/python -m tests.fault.mw_storm --kills 50
	$(BIN)/python -m tests.fault.eval_storm --kills 20
	$(BIN)/python -m pytest -q -m soak $(PYTEST_ARGS)

# Benchmarks B1-B17 against Keras fit/evaluate, tf.train.checkpoints_iterator, the trainer alone, one process
# and a local workdir (about 16 minutes).
bench: data
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Fashion-MNIST as a folder of 32x32 RGB PNGs, a Keras model of one's own, the pair, export and predict;
# then the built-in path on the same images (a few minutes on 2 cores).
demo-folder: data
	$(BIN)/python -m bench.demo_folder

# On a machine with one GPU: training, the pair and evaluation on the GPU (under 5 minutes); figures in bench/gpu/.
gpu-check: data
	PYTHON=$(BIN)/python bench/gpu_check.sh
