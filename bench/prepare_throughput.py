"""Tokenization throughput of `zerotrain prepare` against the obvious alternative with `datasets`.

Both tokenize the same corpus (data/bench-corpus from `make bench-data`: 53 MB of real English in about
4,900 files; one source per folder and per .jsonl file) with the same tokenizer, a byte-level BPE trained on
that corpus first (data_pipeline.train_bpe, not timed). Timed, each in a fresh process from start to end:
    zerotrain   `zerotrain prepare CONFIG --set tokenizer.path=THAT_BPE` into an empty prepared_dir
    datasets    load_dataset("text", sample_by="document") + load_dataset("json"), then
                .map(tokenizer, batched=True, num_proc=os.cpu_count()) + .save_to_disk
Tokens are counted the same way on both sides: every document's tokens plus its eos token (the manifest's
num_tokens; the summed lengths of the map's output, which appends eos as zerotrain does). The two are run
alternately, `--repeats` times each; the figure is the ratio of best tokens/s, zerotrain / datasets (goal >= 1).

    .venv/bin/python bench/prepare_throughput.py [--corpus data/bench-corpus] [--vocab-size 8192] [--repeats 2]
"""
import argparse
import glob
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ZEROTRAIN = Path(sys.executable).with_name("zerotrain")


def sources(corpus: Path) -> list[str]:
    """One source per folder of .txt documents and per .jsonl file (data/bench-corpus: linux-doc, news, ...)."""
    return sorted(str(d / "*.txt") for d in corpus.iterdir() if d.is_dir()) + sorted(map(str, corpus.glob("*.jsonl")))


def corpus_files(corpus: Path) -> list[str]:
    return sorted(f for s in sources(corpus) for f in glob.glob(s))


def train_tokenizer(corpus: Path, out: Path, vocab_size: int) -> None:
    from data_pipeline import train_bpe

    files = corpus_files(corpus)
    texts = itertools.chain((Path(f).read_text() for f in files if f.endswith(".txt")),
                            (json.loads(line)["text"] for f in files if f.endswith(".jsonl")
                             for line in Path(f).read_text().splitlines()))
    train_bpe(texts, vocab_size).save_pretrained(out)


def write_config(corpus: Path, tmp: Path) -> Path:
    """A minimal config: prepared_dir and tokenizer.path are set per run."""
    config = {
        "run": {"name": "bench", "output_dir": str(tmp / "run")},
        "data": {"sources": sources(corpus), "prepared_dir": str(tmp / "unused"), "seq_len": 128},
        "train": {"micro_batch_size": 8, "global_batch_size": 8, "max_steps": 1, "lr": 1.0e-3},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def timed(command: list) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stdout


def zerotrain_prepare(config: Path, tokenizer_dir: Path, out: Path) -> tuple[int, float]:
    from data_pipeline import Manifest

    seconds, _ = timed([ZEROTRAIN, "prepare", config, "--set", f"tokenizer.path={tokenizer_dir}",
                        "--set", f"data.prepared_dir={out}"])
    manifest = Manifest.load(out)
    return sum(manifest.num_tokens(split) for split in ("train", "validation")), seconds


def datasets_prepare(corpus: Path, tokenizer_dir: Path, out: Path) -> tuple[int, float]:
    seconds, stdout = timed([sys.executable, __file__, "--datasets-side", corpus, tokenizer_dir, out])
    return int(stdout.split()[-1]), seconds


def datasets_side(corpus: Path, tokenizer_dir: Path, out: Path) -> None:
    """The alternative, run in its own process: prints its token count."""
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    files = corpus_files(corpus)
    cache = str(out.with_name(out.name + "-cache"))  # fresh: no Arrow cache left from an earlier run
    parts = datasets.concatenate_datasets([
        datasets.load_dataset("text", data_files=[f for f in files if f.endswith(".txt")], sample_by="document",
                              split="train", cache_dir=cache),
        datasets.load_dataset("json", data_files=[f for f in files if f.endswith(".jsonl")], split="train",
                              cache_dir=cache),
    ])

    def tokenize(batch):
        ids = tok(batch["text"], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return {"input_ids": [x + [tok.eos_token_id] for x in ids]}

    tokenized = parts.map(tokenize, batched=True, num_proc=os.cpu_count(), remove_columns=["text"])
    tokenized.save_to_disk(out)
    print(pc.sum(pc.list_value_length(tokenized.data.column("input_ids"))).as_py())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=REPO / "data" / "bench-corpus")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--datasets-side", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.datasets_side:
        return datasets_side(*args.datasets_side)
    corpus = args.corpus.resolve()
    size_mb = sum(os.path.getsize(f) for f in corpus_files(corpus)) / 1e6
    if size_mb < 50:
        sys.exit(f"{corpus}: {size_mb:.1f} MB of text, expected >= 50 MB; run `make bench-data`")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config, tokenizer_dir = write_config(corpus, tmp), tmp / "tokenizer"
        start = time.perf_counter()
        train_tokenizer(corpus, tokenizer_dir, args.vocab_size)
        print(f"corpus {corpus}: {size_mb:.1f} MB; trained a {args.vocab_size}-token BPE on it in "
              f"{time.perf_counter() - start:.0f}s (not timed)", flush=True)
        ours, base = [], []
        sides = [("zerotrain prepare", lambda out: zerotrain_prepare(config, tokenizer_dir, out), ours),
                 ("datasets map", lambda out: datasets_prepare(corpus, tokenizer_dir, out), base)]
        for i in range(args.repeats):
            for name, side, results in sides:
                tokens, seconds = side(tmp / f"{name.split()[0]}{i}")
                results.append(tokens / seconds)
                print(f"repeat {i + 1}: {name}: {tokens:,} tokens in {seconds:.1f}s = {tokens / seconds:,.0f} tokens/s",
                      flush=True)
    print(f"zerotrain prepare / datasets map tokens/s: {max(ours) / max(base):.2f} "
          f"({max(ours):,.0f} vs {max(base):,.0f} tokens/s, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
