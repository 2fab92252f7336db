# saliency_lab — the two commands of the README:
#   make reproduce   create .venv, install, run every experiment notebook (quick profile), fill figures/
#   make test        create .venv, install, check notebooks, run nbdev_test and pytest
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?= quick

.PHONY: install test reproduce check-notebooks nbtest pytest train-embedded clean-cache

$(STAMP): settings.ini setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (saliency_lab)" >/dev/null
	@touch $(STAMP)

install: $(STAMP)

# Notebooks must be clean (nbdev_clean changes nothing) and saliency_lab/ must be what they export.
# Both are checked on a copy, so a working tree is never modified by the check.
check-notebooks: install
	@tmp=$$(mktemp -d); top=$$(pwd); \
	cp -r settings.ini setup.py README.md nbs saliency_lab "$$tmp"/; \
	( cd "$$tmp" && "$$top/$(BIN)/nbdev_clean" >/dev/null && "$$top/$(BIN)/nbdev_export" ) || { rm -rf "$$tmp"; exit 1; }; \
	st=0; \
	diff -r -q -x __pycache__ -x .ipynb_checkpoints nbs "$$tmp/nbs" || { echo "notebooks are not clean: run $(BIN)/nbdev_clean and commit"; st=1; }; \
	diff -r -q -x __pycache__ saliency_lab "$$tmp/saliency_lab" || { echo "saliency_lab/ is out of sync with nbs/: run $(BIN)/nbdev_export and commit"; st=1; }; \
	rm -rf "$$tmp"; exit $$st
	@echo "notebooks clean, saliency_lab/ in sync"

# Two workers with one thread each: two torch processes of two threads each on a 2-core machine slow each other
# several-fold (nbdev_test about 9 min by the make log with 2 threads per worker, 63 s timed with 1; pytest 16 min
# serial, 8.6 min so).
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
TEST_WORKERS ?= 2

nbtest: install
	$(TEST_ENV) $(BIN)/nbdev_test --n_workers $(TEST_WORKERS)

pytest: install
	$(TEST_ENV) $(BIN)/python -m pytest tests -q -p no:cacheprovider -n $(TEST_WORKERS)

test: check-notebooks nbtest pytest

reproduce: install
	$(BIN)/saliency-lab reproduce --profile $(PROFILE)

train-embedded: install
	$(BIN)/saliency-lab train-embedded

clean-cache:
	rm -rf figures/*/.cache
