# Two entry points for a fresh machine: `make demo` and `make test`.
# Installs go through requirements/lock.txt (exact versions of everything, torch's CPU build included),
# so a release elsewhere cannot change what `make test` runs. `make lock` refreshes the lock on purpose;
# `make test-latest` runs the suite on the newest versions pyproject.toml allows, to see drift coming.
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip -q --disable-pip-version-check
STAMP   := $(VENV)/.installed-stamp
LOCK    := requirements/lock.txt
PEERS   := requirements/peers-nodeps.txt
EXTRAS  := test,bench,dev

.PHONY: install browser demo test lint lock test-latest bench clean

install: $(STAMP)

# torch 2.13.0's CPU build lies on this kind of machine's disk; the lock names it without the +cpu
# label, which pip matches to that local build rather than PyPI's multi-GB CUDA one.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) requirements/sync.py $(LOCK)
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PY) -m actscope.build  # compiles the C++ extensions now (sparse kernel, scan pass), not at first use
	touch $(STAMP)

demo: install
	$(VENV)/bin/actscope scan --max-tokens 20000 --out runs/demo

# The report test drives a real headless Chromium (Debian package); installed here when root.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	    else echo "note: install Chromium for the HTML report test (apt-get install chromium)"; fi; }

test: install browser
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check src tests bench

# Resolve pyproject.toml's ranges afresh (pip's resolver, in a throw-away environment) and pin the result.
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip -q --disable-pip-version-check install --upgrade pip setuptools
	.venv-lock/bin/python -m pip -q --disable-pip-version-check install torch==2.13.0
	.venv-lock/bin/python -m pip -q --disable-pip-version-check install -e '.[$(EXTRAS)]'
	.venv-lock/bin/python -m pip -q --disable-pip-version-check install --no-deps -r $(PEERS)
	{ echo "# Written by 'make lock' on $$(date -u +%F) from pyproject.toml's ranges and $(PEERS). Do not edit by hand."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | sed -e 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock
	@echo "lock refreshed: git diff $(LOCK), then make test"

# The same suite on the newest versions pyproject.toml allows, torch included (the eager upgrade moves it
# past the local CPU build to the newest torch the index and local pip config allow).
test-latest: browser
	test -x .venv-latest/bin/python || python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip -q --disable-pip-version-check install --upgrade pip
	.venv-latest/bin/python -m pip -q --disable-pip-version-check install torch==2.13.0
	.venv-latest/bin/python -m pip -q --disable-pip-version-check install --upgrade --upgrade-strategy eager -e '.[$(EXTRAS)]'
	sed -e 's/==.*//' $(PEERS) | .venv-latest/bin/python -m pip -q --disable-pip-version-check install --upgrade --no-deps -r /dev/stdin
	.venv-latest/bin/python -m actscope.build
	.venv-latest/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|numpy|accelerate|safetensors|nnsight|triton)=='
	.venv-latest/bin/python -m pytest -q tests

# steering-vectors and repeng come from the lock (installed without their pins, see $(PEERS))
bench: install
	$(PY) bench/record.py
	$(PY) bench/scan.py
	$(PY) bench/patch.py
	$(PY) bench/steer.py
	$(PY) bench/interventions.py
	$(PY) bench/sparse_kernel.py
	$(PY) bench/sparse_step.py
	$(PY) bench/sparse_breakdown.py
	$(PY) bench/sparse_prompt.py
	$(PY) bench/spine.py
	$(PY) bench/sparsify.py
	$(PY) bench/sparsify.py --dtype bfloat16 --speed-only --methods teal,wina,cats,coreinfer
	$(PY) bench/wina_rotation.py
	$(PY) bench/compare.py
	$(PY) bench/sae.py
	$(PY) -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' && $(PY) bench/sparsify_gpu.py || echo 'no CUDA GPU: bench/sparsify_gpu.py skipped'

clean:
	rm -rf $(VENV) .venv-latest .venv-lock runs .pytest_cache
