# Two commands do all the set-up on a fresh machine:
#   make demo   install into .venv, then run the whole pipeline on the embedded defaults
#   make test   install into .venv, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false

.PHONY: install demo test lint lock s3 compile clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: pip takes these two from the machine's local wheel store.
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	imgclf data ensure
	dvc repro
	dvc metrics show
	dvc plots show
	imgclf registry list

test: install
	lint-imports
	pytest

lint: install
	ruff check . && ruff format --check .

# The image's pinned dependencies (requirements/*.lock.txt) after a change to pyproject.toml;
# `python scripts/lock.py --check` says whether they are stale, `--upgrade` moves every pin.
lock: install
	python scripts/lock.py

s3: install
	imgclf dev s3

compile: install
	imgclf pipeline compile

clean:
	rm -rf out registry .dvc/tmp
