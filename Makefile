# The README's two commands: `make repro` (set-up + the tiny study) and `make test` (set-up + tests).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Nothing the project runs may reach the network.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export RAGAS_DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false
# pip's global config on our machines names local indexes that may be absent: hide that noise.
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: setup repro test bench clean

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -r requirements.txt 2>&1 | $(QUIET_PIP)
	# xgrammar (the local judge's constrained decoding) declares triton (~1 GB, unused on CPU): no deps
	$(VENV)/bin/pip install -q --no-deps xgrammar==0.2.8 2>&1 | $(QUIET_PIP)
	$(VENV)/bin/pip install -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	$(VENV)/bin/python -c "import torch, transformers, trl, peft, dvc; assert torch.__version__.startswith('2.13.0')"
	touch $@

setup: $(VENV)/.installed
	dvc config core.analytics false
	dvc config core.check_update false

repro: setup
	dvc repro

test: setup
	pytest

# The benchmark suite (bench/*.py, results in bench/results/*.json, each with its commit and command).
# kd_cache and generation read the study's models, hence `repro` first; study.py clones the repository
# and reruns the study (~20 min); the README's performance table is regenerated from the results last.
bench: repro
	python bench/gkd.py
	python bench/mfu.py --bf16
	python bench/loss_memory.py
	python bench/imports.py
	python bench/kd_cache.py --teacher llama --alg vanilla
	python bench/kd_cache.py --teacher mistral --alg dskd
	python bench/generation.py
	if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then python bench/gpu_kd.py; \
	else echo "bench: no CUDA device, bench/gpu_kd.py skipped"; fi
	python bench/dvc_rebuilds.py
	python bench/study.py
	python bench/readme_table.py

clean:
	rm -rf $(VENV)
