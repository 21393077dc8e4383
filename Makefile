# cnnserve: make serve | make test | make models | make bench | make proto | make lint
# Every target bootstraps .venv on first use and does nothing when it is up to date.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CNNSERVE := $(VENV)/bin/cnnserve
STAMP := $(VENV)/.installed
REPOSITORY := model_repository
MODELS_STAMP := $(REPOSITORY)/.exported
PROTO_DIR := proto/cnnserve/v1
PROTOS := $(PROTO_DIR)/model_config.proto $(PROTO_DIR)/inference.proto $(PROTO_DIR)/classification.proto
SERVICES := $(PROTO_DIR)/grpc_service.proto $(PROTO_DIR)/classification.proto

.PHONY: install serve test lint models proto bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[export,dev]'
	@if $(PY) -m pip show onnxruntime >/dev/null 2>&1; then \
		echo "plain onnxruntime found beside onnxruntime-gpu: remove .venv and reinstall" >&2; exit 1; fi
	touch $@

models: $(MODELS_STAMP)

$(MODELS_STAMP): $(STAMP) $(wildcard cnnserve/export/*.py) cnnserve/preprocess.py
	$(CNNSERVE) export lenet5 --dataset digits --repository $(REPOSITORY) --version 1 --force
	$(CNNSERVE) export resnet18 --weights auto --repository $(REPOSITORY) --version 1 --force
	touch $@

serve: $(MODELS_STAMP)
	$(CNNSERVE) serve --repository $(REPOSITORY)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest

proto: $(STAMP)
	$(PY) proto/generate.py

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(REPOSITORY)
