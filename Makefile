# The two set-up commands of the README:
#   make demo   install everything, make Fashion-MNIST available, train and print the result table
#   make test   install everything (with the test tools) and run the test suite
# and for the edit loop:
#   make test-interop  tests/interop against the real torchvision and timm, in a second environment
#                    (.venv-interop: a CUDA build of torch, ~5 GB and ~5 minutes the first time)
#   make test-fast   the same without the tests marked slow (-m "not slow": torchrun, subprocess and kill
#                    tests, terminal and compile tests; each > ~5 s): a few minutes
# Works on a fresh Debian machine with Python >= 3.10 (python3-venv). TORCH_INDEX can point pip at
# another wheel index for torch (e.g. https://download.pytorch.org/whl/cpu for a small CPU build).

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
FMNIST_DIR := /usr/share/datasets/fashion-mnist
DEMO_ARGS ?=
TEST_WORKERS ?= 2
INTEROP_VENV ?= .venv-interop
INTEROP_TORCH ?= 2.14.1
INTEROP_TORCHVISION ?= 0.29.1

.PHONY: demo test test-fast test-interop install install-test data lint clean gpu-kit

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

install: $(VENV)/.torch
	$(PIP) install --quiet -e .

install-test: $(VENV)/.torch
	$(PIP) install --quiet -e ".[test]"

# Fashion-MNIST, the built-in default data: from Debian's package when it is not there yet.
data:
	@if [ -f "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ] || [ -f "$${FUSIONKD_DATA:-/nonexistent}/fashion-mnist/train-images-idx3-ubyte.gz" ]; then \
		echo "Fashion-MNIST found"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist); \
	else \
		sudo apt-get install -y -q dataset-fashion-mnist; \
	fi

demo: install data
	$(VENV)/bin/fusionkd demo $(DEMO_ARGS)

test: install-test
	-@$(MAKE) --no-print-directory data  # the real-data tests skip when it cannot be installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: install-test
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# model=torchvision:NAME / timm:NAME (docs/models.md) against the real packages; the core suite skips tests/interop
# (created when missing; an existing one that already has the packages and this checkout's fusionkd is kept;
# matplotlib for the plots of experiments/fmnist_protocol.sh vit, which runs there)
$(INTEROP_VENV)/.ready:
	@if $(INTEROP_VENV)/bin/python -c "import torchvision, timm, pytest, matplotlib, fusionkd, sys; \
		sys.exit(not fusionkd.__file__.startswith('$(CURDIR)/'))" 2>/dev/null; then \
		echo "$(INTEROP_VENV) is ready"; \
	else \
		$(PYTHON) -m venv $(INTEROP_VENV) && \
		$(INTEROP_VENV)/bin/python -m pip install --quiet --upgrade pip && \
		$(INTEROP_VENV)/bin/python -m pip install --quiet "torch==$(INTEROP_TORCH)" \
			"torchvision==$(INTEROP_TORCHVISION)" timm pytest pyyaml numpy pillow matplotlib && \
		$(INTEROP_VENV)/bin/python -m pip install --quiet --no-deps -e .; \
	fi
	touch $@

test-interop: $(INTEROP_VENV)/.ready
	OMP_NUM_THREADS=1 $(INTEROP_VENV)/bin/python -m pytest -q tests/interop -p no:cacheprovider

lint: install-test
	$(VENV)/bin/ruff check src tests benchmarks

# .gpu-kit/: what benchmarks/gpu_check.py needs on a GPU machine that reaches no package registry, to carry
# with the working tree (docs/performance.md): pytest for Python 3.12 (pure Python) and Fashion-MNIST's
# four files; about 45 MB. The machine's own packages win; the kit only fills gaps.
gpu-kit: install data
	$(PIP) install --quiet --upgrade --target .gpu-kit/site --python-version 3.12 --only-binary=:all: \
		--implementation cp --platform manylinux2014_x86_64 pytest
	mkdir -p .gpu-kit/fashion-mnist
	cp $(FMNIST_DIR)/*-ubyte.gz .gpu-kit/fashion-mnist/
	@du -sh .gpu-kit

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
