# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test install lint bench clean-venv

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,viz]"
	touch $(STAMP)

install: $(STAMP)

# MoCo v2 on CIFAR-10 (../shared/data), then kNN of the pretrained vs a random-init encoder.
demo: $(STAMP)
	$(PY) -m experiments.demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m experiments.bench_train -a resnet18 -b 128 --image-size 32
	$(PY) -m kernels.bench --quick

clean-venv:
	rm -rf $(VENV)
