# qdrift: build a virtualenv on a fresh machine and run the main job or the tests.
#   make demo   the main job on the built-in default
#   make test   the test suite
# TORCH overrides the torch requirement (default: the CPU wheel torch==2.13.0).

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: venv demo test analytic overhead clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[test,kdiffusion,bench,integrations]"
	# k-diffusion is the reference the tests compare against; --no-deps keeps torchvision (and a CUDA torch) out.
	$(PIP) install --no-deps "k-diffusion==0.1.1.post1"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/qdrift bench

test: venv
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

analytic: venv
	$(BIN)/qdrift analytic

overhead: venv
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
