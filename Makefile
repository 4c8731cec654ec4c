# Large Language Models, from Theory to Practice - the Multimodal Edition
# `make lab` opens the book, `make test` verifies it. Both set up .venv first.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mmbook-installed
NB     ?= chapters
# Notebooks run on two workers where there are two cores or more (each notebook uses one thread).
JOBS   ?= $(shell n=$$(nproc 2>/dev/null || echo 1); if [ $$n -ge 2 ]; then echo 2; else echo 1; fi)
# JupyterLab (make lab) and the HTML book's server (make book-serve) listen on different ports, so both can run.
LAB_PORT  ?= 8888
BOOK_PORT ?= 8000
# JupyterLab refuses to run as root (containers, CI) unless told it may.
LAB_FLAGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

# The environment every notebook run (tests and regeneration) sees.
export PYTHONHASHSEED := 0
export JUPYTER_PLATFORM_DIRS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# One intra-op thread per notebook: the book's models are tiny, so threads mostly add overhead (and thrash
# badly on a busy machine), and single-threaded results do not depend on the number of cores.
export OMP_NUM_THREADS := 1
export MKL_NUM_THREADS := 1

NBVAL_FLAGS := --nbval-current-env --nbval-cell-timeout=600 \
               --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:randomly
ifneq ($(JOBS),1)
NBVAL_FLAGS += -n $(JOBS) --dist loadfile
endif

SITE := _build/book
# Sphinx with myst-nb renders the stored outputs (nothing is executed); warnings are errors, so a broken
# cross-reference fails the build.
SPHINX_FLAGS := -q -b html -c book -W --keep-going -j auto

.PHONY: help venv lab test test-unit test-notebooks test-gpu test-portable test-seeds test-book check-notebooks regen \
        lint doctor i18n-update \
        book book-serve clean

help:
	@echo "make lab        set up .venv (once) and open the book in JupyterLab"
	@echo "make test       set up .venv (once), run unit tests, notebook hygiene, strict nbval and the book test"
	@echo "make test-gpu   nbval-lax on every notebook with MMBOOK_DEVICE=cuda"
	@echo "make test-portable  strict nbval with perturbed numerics (portable BLAS path, no SIMD dispatch, 2 threads)"
	@echo "make test-seeds nbval-lax on every notebook with every seed shifted (SHIFTS=\"1 2\")"
	@echo "make regen      re-execute notebooks on CPU in place (NB=path to limit)"
	@echo "make book       build the HTML book from the stored outputs into $(SITE)"
	@echo "make book-serve serve $(SITE) on http://127.0.0.1:$(BOOK_PORT) (make lab uses port $(LAB_PORT))"
	@echo "make lint       ruff over mmbook, tests, tools and notebooks"
	@echo "make i18n-update  merge the English prose into the translation catalogs (locales/; DOCS= to start more)"
	@echo "                LANG=zh_CN with lab, book or test-book: the Chinese edition"
	@echo "make doctor     versions, device and chapter imports"
	@echo "make clean      remove .venv, caches and built files"

venv: $(STAMP)

# The Chinese edition (make lab LANG=zh_CN, make book LANG=zh_CN, make test-book LANG=zh_CN): generated into
# _build/zh_CN from the English notebooks and the message catalogs in locales/ (tools/i18n.py). LANG is also the
# shell's locale variable, so only the exact value zh_CN selects it, and the tools themselves run with C.UTF-8.
ifeq ($(LANG),zh_CN)
EDITION := zh_CN
endif

# JupyterLab's settings for this environment (tools/lab): no news or update pop-up (both would fetch from the web),
# and kernels started by Lab use encrypted sockets (no "running over TCP without encryption" warning).
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.json
SERVER_CONFIG := $(VENV)/etc/jupyter/jupyter_server_config.json

# Reinstall only when requirements.txt, pyproject.toml or the Lab settings changed (the stamp is newer otherwise).
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml tools/lab/overrides.json tools/lab/jupyter_server_config.json
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@mkdir -p $(dir $(LAB_SETTINGS)) $(dir $(SERVER_CONFIG))
	cp tools/lab/overrides.json $(LAB_SETTINGS)
	cp tools/lab/jupyter_server_config.json $(SERVER_CONFIG)
	@touch $(STAMP)

# The book's notebooks are marked trusted for this user first (jupyter trust: their outputs come from make regen),
# so Lab shows their stored widgets and HTML as they are, and does not log "Notebook ... is not trusted".
ifeq ($(EDITION),zh_CN)
lab: $(STAMP)
	@LANG=C.UTF-8 $(PY) tools/i18n.py generate zh_CN
	@LANG=C.UTF-8 $(PY) -m jupyter trust _build/zh_CN/chapters/*.ipynb _build/zh_CN/chapters/solutions/*.ipynb > /dev/null
	@echo "Starting JupyterLab on the Chinese edition (_build/zh_CN/chapters) at port $(LAB_PORT); open the URL below."
	LANG=C.UTF-8 $(PY) -m jupyterlab --no-browser --port=$(LAB_PORT) --ServerApp.root_dir=_build/zh_CN/chapters $(LAB_FLAGS)
else
lab: $(STAMP)
	@$(PY) -m jupyter trust chapters/*.ipynb chapters/solutions/*.ipynb > /dev/null
	@echo "Starting JupyterLab on chapters/ at port $(LAB_PORT) (Ctrl-C to stop); open the URL printed below."
	$(PY) -m jupyterlab --no-browser --port=$(LAB_PORT) --ServerApp.root_dir=chapters $(LAB_FLAGS)
endif

# All four stages run even when one fails, so a single run reports every problem.
test: $(STAMP)
	@status=0; \
	MMBOOK_DEVICE=cpu $(PY) -m pytest -q tests --ignore=tests/book || status=1; \
	$(PY) tools/check_notebooks.py chapters || status=1; \
	MMBOOK_DEVICE=cpu $(PY) -m pytest --nbval $(NBVAL_FLAGS) chapters || status=1; \
	{ $(PY) -m sphinx $(SPHINX_FLAGS) . $(SITE) && $(PY) -m pytest -q tests/book; } || status=1; \
	if [ $$status -ne 0 ]; then echo "make test: FAILED (see above)"; else echo "make test: all stages passed"; fi; \
	exit $$status

test-unit: $(STAMP)
	MMBOOK_DEVICE=cpu $(PY) -m pytest -q tests --ignore=tests/book

check-notebooks: $(STAMP)
	$(PY) tools/check_notebooks.py chapters

test-notebooks: $(STAMP)
	MMBOOK_DEVICE=cpu $(PY) -m pytest --nbval $(NBVAL_FLAGS) $(NB)

test-gpu: $(STAMP)
	MMBOOK_DEVICE=cuda $(PY) -m pytest -q tests --ignore=tests/book
	MMBOOK_DEVICE=cuda $(PY) -m pytest --nbval-lax $(NBVAL_FLAGS) chapters

# Another reader's machine, stood in for on this one: MKL's conditional-numerical-reproducibility mode on its
# portable code path, ATen's kernels without SIMD dispatch (ATEN_CPU_CAPABILITY=default), and two intra-op threads
# (other reduction orders). The stored outputs must still match exactly. Two notebooks of two threads each share
# two cores, so OpenMP's idle threads must sleep rather than spin (OMP_WAIT_POLICY=PASSIVE: the same numbers, and
# chapter 1 and its solutions take 58 s together instead of 184 s).
PORTABLE_ENV := MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE
test-portable: $(STAMP)
	$(PORTABLE_ENV) MMBOOK_DEVICE=cpu $(PY) -m pytest --nbval $(NBVAL_FLAGS) $(NB)

# Every seed the book uses goes through mmbook.seed, which MMBOOK_SEED_SHIFT shifts: every assertion must hold
# for other seeds too (lax mode: printed values differ, the asserted claims must not).
SHIFTS ?= 1 2
test-seeds: $(STAMP)
	@status=0; for k in $(SHIFTS); do \
	  echo "== MMBOOK_SEED_SHIFT=$$k"; \
	  MMBOOK_SEED_SHIFT=$$k MMBOOK_DEVICE=cpu $(PY) -m pytest --nbval-lax $(NBVAL_FLAGS) $(NB) || status=1; \
	done; exit $$status

regen: $(STAMP)
	REGEN_JOBS=$(JOBS) MMBOOK_DEVICE=cpu $(PY) tools/regen.py $(NB)

ifeq ($(EDITION),zh_CN)
book: $(STAMP)
	LANG=C.UTF-8 $(PY) tools/i18n.py generate zh_CN
	LANG=C.UTF-8 $(PY) -m sphinx $(SPHINX_FLAGS) -D language=zh_CN _build/zh_CN $(SITE)/zh_CN
	@echo "Built $(SITE)/zh_CN/index.html (the Chinese edition; the English one is $(SITE)/index.html)."
else
book: $(STAMP)
	$(PY) -m sphinx $(SPHINX_FLAGS) . $(SITE)
	@echo "Built $(SITE)/index.html: open it in a browser, or run 'make book-serve'."
endif

book-serve: book
	@echo "Serving the HTML book on http://127.0.0.1:$(BOOK_PORT) (Ctrl-C to stop)"
	$(PY) -m http.server $(BOOK_PORT) --bind 127.0.0.1 --directory $(SITE)

# Opens every page of the built book in headless Chromium (skipped with the reason where there is none).
test-book: book
	LANG=C.UTF-8 MMBOOK_BOOK_EDITION=$(or $(EDITION),en) $(PY) -m pytest -q tests/book

# Merge the English source's current prose into the translation catalogs (new blocks untranslated, changed ones
# fuzzy); DOCS=... starts catalogs for more documents. tools/i18n.py status zh_CN shows what is left.
i18n-update: $(STAMP)
	$(PY) tools/i18n.py update zh_CN $(DOCS)

lint: $(STAMP)
	$(PY) -m ruff check mmbook tests tools chapters book conftest.py

doctor: $(STAMP)
	$(PY) -m mmbook.doctor

clean:
	rm -rf $(VENV) build _build *.egg-info .pytest_cache .ruff_cache data/cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name .ipynb_checkpoints -type d -prune -exec rm -rf {} +
