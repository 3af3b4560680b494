"""MFU and tokens/s per GPU of zerotrain training configs/llama_1b.yaml's model (1.04B-parameter Llama) on one GPU
at ZeRO stages 1, 2 and 3: the real `zerotrain prepare` + `zerotrain train` with --set overrides, bf16, the
preset's sequence length (2048), world size 1.

Made for one NVIDIA H200 (no internet, the repository's working tree only): the script writes its own corpus,
JSON lines of words drawn from a random lexicon (as good as random tokens: no data to fetch), and
`zerotrain prepare` trains the preset's 32,000-token BPE on it. Each stage is one `zerotrain train` run of
`--warmup` + `--timed` steps at micro-batch `--micro-batch` (no accumulation), logging every `--warmup` steps;
the figures are the trainer's own logged perf/tokens_per_s_per_rank, perf/model_tflops_per_rank and perf/mfu
(against the GPU's data-sheet bf16 peak, trainer/perf.py: 989 TFLOP/s for an H200) over the windows after the
warm-up, weighted by their time. The peak memory (mem/peak_allocated_gib), the run's wall time (start-up,
steps, one validation batch, the final save) and the final checkpoint's save time (perf/checkpoint_s) come
from the same run; each run's directory is deleted afterwards (a 1B ZeRO checkpoint is ~14 GB).

    python3 bench/gpu_llama_1b.py                    # on the GPU machine: 3 stages, ~4-6 minutes
    python3 bench/gpu_llama_1b.py --stages 1 --set train.compile=true   # compiled, ZeRO 1
    .venv/bin/python bench/gpu_llama_1b.py --smoke   # anywhere (CPU): a 2-layer, hidden-64 model, 2 steps each

Needs zerotrain's dependencies beside a CUDA torch; nothing is installed and nothing fetched. An offline GPU
image with torch, transformers, accelerate and tokenizers but no DeepSpeed, pydantic or datasets takes them
as wheels made where there is internet: `DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation
deepspeed==0.19.8` (a py3-none-any wheel), plus hjson, pydantic, pydantic_core, annotated-types,
typing-inspection, datasets, dill and multiprocess for its Python. The script checks its imports first and
names what is missing.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "llama_1b.yaml"
NEEDED = ("torch", "deepspeed", "transformers", "accelerate", "datasets", "tokenizers", "pydantic", "yaml",
          "tensorboard", "psutil", "matplotlib")
SMOKE_MODEL = ["model.config.hidden_size=64", "model.config.intermediate_size=128", "model.config.num_hidden_layers=2",
               "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2"]


def missing_packages() -> list[str]:
    import importlib.util

    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


# ---------------------------------------------------------------------------------------------------------------
# data


def write_corpus(path: Path, words: int, seed: int = 0, lexicon: int = 40_000, doc_words: int = 800) -> None:
    """JSON lines of `text` documents: words drawn (Zipf-like) from a lexicon of random lowercase strings, rich
    enough for a 32k BPE to fill its vocabulary."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, n)) for n in rng.integers(2, 10, lexicon)]
    weights = 1.0 / np.arange(1, lexicon + 1) ** 0.8
    drawn = rng.choice(lexicon, size=words, p=weights / weights.sum())
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for start in range(0, words, doc_words):
            f.write(json.dumps({"text": " ".join(vocab[i] for i in drawn[start:start + doc_words])}) + "\n")


def data_overrides(work: Path, args) -> list[str]:
    return [f"data.sources=[{{path: {work / 'corpus' / 'synthetic.jsonl'}, name: synthetic}}]", "data.text_field=text",
            f"data.prepared_dir={work / 'prepared'}", "data.validation_fraction=0.05",
            f"tokenizer.vocab_size={args.vocab}", f"data.seq_len={args.seq_len}"]


class Failed(RuntimeError):
    pass


def zerotrain(command: str, sets: list[str], log: Path, timeout: float | None = None) -> float:
    """`zerotrain COMMAND configs/llama_1b.yaml --set ...`; its seconds. Output to `log`; on failure, its tail."""
    start = time.perf_counter()
    with log.open("w") as out:
        try:
            done = subprocess.run([sys.executable, "-m", "launcher.cli", command, str(PRESET),
                                   *[a for s in sets for a in ("--set", s)]], cwd=REPO, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout)
            code = done.returncode
        except subprocess.TimeoutExpired:  # the launcher is killed; its ranks die with it (PR_SET_PDEATHSIG)
            code = f"timed out after {timeout:.0f} s"
    if code:
        raise Failed(f"zerotrain {command} failed ({code}); the end of its output:\n"
                     + "\n".join(log.read_text().splitlines()[-30:]))
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# one stage


def train_overrides(work: Path, args, stage: int) -> list[str]:
    steps = args.warmup + args.timed
    return [*data_overrides(work, args), *(SMOKE_MODEL if args.smoke else []), f"run.output_dir={work / f'zero{stage}'}",
            f"zero.stage={stage}", "launch.nnodes=1", "launch.nproc_per_node=1",
            f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_size={args.micro_batch}",
            f"train.max_steps={steps}", "optim.warmup_steps=1", f"train.log_every={args.warmup}", "eval.every=0",
            "eval.batches=1", "checkpoint.every=0", "checkpoint.keep_last=1", *args.set]


def summarise(run_dir: Path, warmup: int) -> dict:
    """The logged windows after the warm-up, weighted by their time; peak memory; the final save's seconds."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "perf/mfu" in r]
    timed = [(r, r["step"] - p["step"]) for p, r in zip(windows, windows[1:]) if p["step"] >= warmup]
    seconds = sum(n * r["perf/step_s"] for r, n in timed)
    mean = {key: sum(n * r["perf/step_s"] * r[key] for r, n in timed) / seconds
            for key in ("perf/tokens_per_s_per_rank", "perf/model_tflops_per_rank", "perf/mfu")}
    phases = {key: sum(n * r[key] for r, n in timed) / sum(n for _, n in timed)
              for key in ("perf/step_s", "perf/forward_s", "perf/backward_s", "perf/optimizer_s", "perf/data_s")}
    memory_key = "mem/peak_allocated_gib" if "mem/peak_allocated_gib" in windows[-1] else "mem/rss_gib"  # GPU / CPU
    saves = [r["perf/checkpoint_s"] for r in records if "perf/checkpoint_s" in r]
    log = (run_dir / "logs" / "rank0.log").read_text().splitlines()
    return {**mean, **phases, "memory_gib": windows[-1][memory_key], "memory_key": memory_key,
            "checkpoint_s": saves[-1] if saves else float("nan"), "steps": sum(n for _, n in timed),
            "model": next(line.split("INFO ", 1)[1] for line in log if "INFO model: " in line),
            "peak": next(line.split("INFO ", 1)[1] for line in log if "MFU against" in line)}


def run_stage(work: Path, args, stage: int, timeout: float) -> dict:
    run_dir = work / f"zero{stage}"
    try:
        seconds = zerotrain("train", train_overrides(work, args, stage), work / f"train-zero{stage}.log", timeout)
        return {**summarise(run_dir, args.warmup), "stage": stage, "wall_s": seconds}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------


def table(results: list[dict], args) -> str:
    """A Markdown table, one row per completed stage."""
    if not results:
        return "(no stage completed)"
    mem = "peak GiB" if results[0]["memory_key"] == "mem/peak_allocated_gib" else "RSS GiB"
    head = ["ZeRO", "tokens/step", "tokens/s/GPU", "TFLOP/s/GPU", "MFU", "step s", "fwd / bwd / opt s", mem,
            "run s", "save s"]
    rows = [[str(r["stage"]), f"{args.micro_batch} x {args.seq_len}", f"{r['perf/tokens_per_s_per_rank']:,.0f}",
             f"{r['perf/model_tflops_per_rank']:.1f}", f"{r['perf/mfu']:.3f}", f"{r['perf/step_s']:.3f}",
             f"{r['perf/forward_s']:.3f} / {r['perf/backward_s']:.3f} / {r['perf/optimizer_s']:.3f}",
             f"{r['memory_gib']:.1f}", f"{r['wall_s']:.0f}", f"{r['checkpoint_s']:.1f}"] for r in results]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per step (the plan: ~50 GiB at 8)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--warmup", type=int, default=4, help="steps before the timed ones (also the log window)")
    parser.add_argument("--timed", type=int, default=12, help="timed steps (a multiple of --warmup)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more overrides of every run, e.g. train.compile=true, train.loss_chunk_tokens=4096")
    parser.add_argument("--smoke", action="store_true", help="tiny model, short sequences, 1 + 1 steps: a CPU check")
    parser.add_argument("--workdir", help="scratch folder (default: a new temporary one, deleted at the end)")
    parser.add_argument("--budget", type=float, default=450, help="seconds: a stage that would start later is "
                        "skipped, and a run is stopped when they are spent")
    args = parser.parse_args()
    if args.smoke:
        args.micro_batch, args.seq_len, args.vocab, args.warmup, args.timed = 2, 64, 512, 1, 1
    if args.timed % args.warmup:
        parser.error("--timed must be a multiple of --warmup (log windows must end on the warm-up)")
    if missing := missing_packages():
        sys.exit(f"missing Python packages: {', '.join(missing)} (see this script's docstring)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("DS_BUILD_OPS", "0")
    started = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_llama_1b-"))
    results = []
    try:
        corpus = work / "corpus" / "synthetic.jsonl"
        if not corpus.exists():  # a --workdir shared by several invocations prepares once (rewriting would not)
            write_corpus(corpus, int(1.5 * (args.warmup + args.timed) * args.micro_batch * args.seq_len) + 50_000)
        prep = zerotrain("prepare", data_overrides(work, args), work / "prepare.log")
        print(f"corpus: {corpus.stat().st_size / 1e6:.1f} MB; zerotrain prepare: {prep:.0f} s", flush=True)
        for stage in args.stages:
            left = args.budget - (time.perf_counter() - started)
            if left < 60:
                print(f"ZeRO-{stage}: skipped, {left:.0f} s of the --budget left", flush=True)
                continue
            try:
                results.append(run_stage(work, args, stage, timeout=left))
            except Failed as e:
                print(f"ZeRO-{stage}: {e}", flush=True)
                continue
            r = results[-1]
            print(f"ZeRO-{stage}: {r['perf/tokens_per_s_per_rank']:,.0f} tokens/s/GPU, MFU {r['perf/mfu']:.3f} "
                  f"({r['steps']} timed steps, run {r['wall_s']:.0f} s)", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if results:
        print(f"\n{results[0]['model']}\n{results[0]['peak']}")
    print(f"{table(results, args)}\ntotal {time.perf_counter() - started:.0f} s")
    sys.exit(0 if len(results) == len(args.stages) else 1)


if __name__ == "__main__":
    main()
