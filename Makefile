# weightscope: `make book` builds the book for TARGET (default demo); `make test` runs the test suite.
# Each target creates .venv and installs the pinned requirements by itself when needed.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
TARGET ?= demo
PY := .venv/bin/python
SHARED ?= $(abspath ../shared)

# Offline inputs: point the library at ../shared when it exists (users with internet need neither).
ifneq ($(wildcard $(SHARED)/models/stories260K),)
export WEIGHTSCOPE_MODELS ?= $(SHARED)/models
endif
ifneq ($(wildcard $(SHARED)/corpora),)
export WEIGHTSCOPE_CORPORA ?= $(SHARED)/corpora
endif
export PYTHONUNBUFFERED := 1

.PHONY: book test test-fast nbval nbval-refresh demo-saes demo-checksums processor-check bench clean setup atlas
setup: .venv/.installed

.venv/.installed: requirements.txt pyproject.toml
	@echo "[setup] installing pinned requirements into .venv (first time: several minutes) ..."
	@# a .venv whose first setup never finished (interrupted) is made again from scratch
	@test -f $@ || rm -rf .venv
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	@$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	@touch $@
	@echo "[setup] .venv ready"

# The runner's last line is its one-line message; its exit codes are in book/appendix/reliability.md.
# make itself exits 2 on any failure and then names the runner's code ("make: *** [...] Error 3").
book: .venv/.installed
	@$(PY) -m weightscope.publish.book --target $(TARGET)

# The last line says whether the page-output check (nbval) ran: it is skipped only when an input is missing.
test: .venv/.installed
	@start=$$(date +%s); log=$$(mktemp); status=0; $(PY) -m pytest 2>&1 | tee $$log || status=$$?; \
	skip=$$(grep -m1 -o "SKIPPED \[[0-9]*\] tests/test_nbval.py.*" $$log | sed 's/^SKIPPED \[[0-9]*\] //' || true); rm -f $$log; \
	echo "make test: finished in $$(( $$(date +%s) - start )) s$${skip:+; the page outputs were NOT checked (nbval skipped: $$skip)}"; \
	exit $$status

test-fast: .venv/.installed
	@$(PY) -m pytest -m "not slow"

# the demo chapters against their stored outputs (tests/nbval/), and regenerating those references
nbval: .venv/.installed
	@$(PY) -m pytest tests/test_nbval.py

nbval-refresh: .venv/.installed
	@$(PY) tests/nbval_refresh.py

# Retrain the demo SAEs into data/cache (the book never does: it reads the pinned ones in data/demo_saes/),
# compare their quality with the pinned ones' and print the command that adopts them.
demo-saes: .venv/.installed
	@$(PY) -m weightscope.prepare.demo_saes --config default --config attn

# Store the fingerprints of the demo's main result tables beside the pinned SAEs (after a change meant to move them)
demo-checksums: .venv/.installed
	@$(PY) tests/demo_checksums.py --write

# The demo's chapters with this machine's kernels and with another instruction set, every stored table
# compared: a result that follows the processor's rounding (a near-tie in a top-k) shows here
processor-check: .venv/.installed
	@$(PY) tests/processor_check.py

clean:
	rm -rf book/_build book/_toc.yml

bench: .venv/.installed
	@$(PY) bench/run.py

# the weights-only atlas: chapters 1 and 2 for every SAE on a list, on Ray (ATLAS_LIST default: the shipped
# list of residual releases; ATLAS_ARGS e.g. "--address 10.0.0.5:6379 --workers 4" or "--dry-run")
ATLAS_LIST ?= lib/weightscope/publish/atlas_default.yaml
atlas: .venv/.installed
	@$(PY) -m weightscope.publish.atlas $(ATLAS_LIST) $(ATLAS_ARGS)
