# One command each: `make test` and `make demo` set up everything they need.
# The virtual environment lives outside the checkout so fresh clones (and CI) reuse it.
VENV ?= $(HOME)/.cache/mimco/venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data test demo mutate clean-venv

$(PY):
	python3 -m venv $(VENV)

setup: $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"

# Fashion-MNIST from Debian's dataset-fashion-mnist package (needs root; skipped when present).
data:
	@test -f $(FMNIST)/train-images-idx3-ubyte.gz || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; }

test: setup data
	$(PY) -m pytest -q

demo: setup data
	$(VENV)/bin/mimco demo

# Mutation testing of masking.py and methods/ (slow, outside CI; docs/architecture.md#mutation-testing)
mutate: setup
	$(PY) -m pip install -q --disable-pip-version-check "mutmut>=3.3"
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2; $(VENV)/bin/mutmut results > mutmut-results.txt; tail -n 3 mutmut-results.txt

clean-venv:
	rm -rf $(VENV)
