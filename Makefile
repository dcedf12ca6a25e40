# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
REF_VENV := .venv-ref
SERVE_VENV := .venv-serve
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check -q
export PIP_PROGRESS_BAR := off

.PHONY: demo test test-fast lint install reference-env serve-env clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# timm imports torchvision, and PyPI's torchvision does not load beside the CPU build
# of torch 2.13 (its C extension links libtorch_cuda). The reference environment holds
# the pair that does load (torch 2.14.1 + torchvision 0.29.1, both on this disk) plus
# timm; tests run it in a subprocess to produce timm's outputs for the same weights.
$(REF_VENV)/.installed: tests/reference/requirements.txt
	$(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/pip --disable-pip-version-check -q install -r tests/reference/requirements.txt
	touch $@

reference-env: $(REF_VENV)/.installed

# The serving environment: the tritonserver binary from nvidia-pytriton, which pins
# numpy<2, so it cannot share .venv (numpy 2). Python-backend models import attnserve
# (numpy + onnxruntime + opencv, no torch) inside the server, hence --no-deps.
$(SERVE_VENV)/.installed: pyproject.toml requirements-serve.txt
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip --disable-pip-version-check -q install -r requirements-serve.txt
	$(SERVE_VENV)/bin/pip --disable-pip-version-check -q install --no-deps -e .
	touch $@

serve-env: $(SERVE_VENV)/.installed

# Two workers, one per core, each taking whole files: exporting is mostly single-threaded
# Python (tracing); when measured, two workers took ~9 minutes against ~14 for one (the
# suite has grown since: 17.6 minutes in the last fresh-clone run). Files keep their
# exports (the session fixture) within one worker.
PYTEST := $(VENV)/bin/pytest -q -n 2 --dist loadfile --durations=15

test: install reference-env serve-env
	$(PYTEST)

test-fast: install serve-env
	$(PYTEST) -m "not slow and not reference"

lint: install
	$(VENV)/bin/ruff check src tests

demo: install serve-env
	$(VENV)/bin/attnserve demo

clean:
	rm -rf $(VENV) $(REF_VENV) $(SERVE_VENV) out
