# One command each: `make test` and `make demo` set up everything they need.
# The virtual environment lives outside the checkout so fresh clones (and CI) reuse it.
VENV ?= $(HOME)/.cache/mimco/venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist

FLOOR_VENV ?= $(HOME)/.cache/mimco/venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python

.PHONY: setup data slurm slurm-up slurm-down lint test test-fast demo device-wheels test-floor mutate clean-venv

$(PY):
	python3 -m venv $(VENV)

setup: $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"

# Fashion-MNIST from Debian's dataset-fashion-mnist package (needs root; skipped when present).
data:
	@test -f $(FMNIST)/train-images-idx3-ubyte.gz || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; }

# Debian's slurm-wlm and munge, for the SLURM tests against real daemons (installed as root where missing;
# without root the real-SLURM tests skip, each saying why).
slurm:
	@if command -v slurmctld >/dev/null && command -v munged >/dev/null; then :; \
	elif [ "$$(id -u)" != 0 ]; then echo "make slurm: slurm-wlm/munge missing and not root: the real-SLURM tests skip"; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; fi

# A one-node SLURM cluster of its own in SLURM_DIR, for trying scripts/slurm/pretrain.sbatch by hand:
# `make slurm-up`, then the printed `export SLURM_CONF=...`, then sbatch; `make slurm-down` stops it.
SLURM_DIR ?= /tmp/mimco-slurm
slurm-up: setup slurm
	$(PY) -m tests.slurm_cluster up $(SLURM_DIR)

slurm-down: setup
	$(PY) -m tests.slurm_cluster down $(SLURM_DIR)

# ruff: pyflakes, pycodestyle (120 columns), import order, pyupgrade, bugbear (pyproject.toml)
lint: setup
	$(VENV)/bin/ruff check .

test: setup data slurm
	$(PY) -m pytest -q

# the fast loop: every test but the end-to-end ones marked slow
test-fast: setup data
	$(PY) -m pytest -q -m "not slow"

# Wheels of what a lent GPU machine's image lacks (kornia, kornia_rs) or may hold too old (timm), at the
# versions installed here, for its CPython 3.12 and for this Python; carried there as .device-wheels
# (docs/performance.md#gpu-check). About 15 MiB.
device-wheels: setup
	$(PY) benchmarks/device_env.py wheels

# Every dependency at the floor pyproject.toml declares (torch 2.11 / torchvision 0.26: the GPU image's),
# in a venv of its own: gpu_check.sh --cpu with kornia only from .device-wheels, then the fast tests.
# Outside CI (it downloads torch 2.11, several GB, once).
test-floor: device-wheels data
	test -x $(FLOOR_PY) || python3 -m venv $(FLOOR_VENV)
	$(PY) benchmarks/device_env.py floors > $(FLOOR_VENV)/floors.txt
	$(FLOOR_PY) -m pip install -q --disable-pip-version-check -c $(FLOOR_VENV)/floors.txt \
	  $$(grep -v '^kornia' $(FLOOR_VENV)/floors.txt | sed 's/==.*//') "pytest>=7.0"
	$(FLOOR_PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	$(FLOOR_PY) -m pip uninstall -q -y kornia kornia_rs 2>/dev/null || true
	PYTHON=$(FLOOR_PY) bash benchmarks/gpu_check.sh --cpu
	$(FLOOR_PY) -m pip install -q --disable-pip-version-check -c $(FLOOR_VENV)/floors.txt kornia
	$(FLOOR_PY) -m pip list --disable-pip-version-check 2>/dev/null | grep -iE '^(torch|torchvision|timm|kornia|numpy|pillow|matplotlib|scikit-learn|safetensors|pyyaml|tqdm) '
	$(FLOOR_PY) -m pytest -q -m "not slow" -p no:cacheprovider

demo: setup data
	$(VENV)/bin/mimco demo

# Mutation testing of masking.py and methods/ (slow, outside CI; docs/architecture.md#mutation-testing)
mutate: setup
	$(PY) -m pip install -q --disable-pip-version-check "mutmut>=3.3"
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2; $(VENV)/bin/mutmut results > mutmut-results.txt; tail -n 3 mutmut-results.txt

clean-venv:
	rm -rf $(VENV)
