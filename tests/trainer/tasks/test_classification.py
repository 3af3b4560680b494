"""Fine-tuning (model.task: classification): real encoder, real labelled text, real ranks, real exports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from transformers import BertConfig, BertModel

from data_pipeline import DataConfig, DataError, LabelledData, load_tokenizer, prepare_labelled
from helpers import REPO, read_metrics, train_losses, zerotrain

SENTIMENT = REPO / "configs" / "finetune_sentiment.yaml"
MINILM = REPO / "data" / "models" / "all-MiniLM-L6-v2"
ROTTEN = REPO / "data" / "rotten_tomatoes" / "rotten_tomatoes_corpus_full.csv.bz2"
# A BERT small enough for a rank to take a step in well under a second, read with MiniLM's real WordPiece vocabulary.
TINY_BERT = "{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, " \
            "max_position_embeddings: 64}"


@pytest.fixture(scope="session")
def minilm():
    if not (MINILM / "model.safetensors").is_file() or not ROTTEN.is_file():
        pytest.fail(f"the fine-tuning model or data is missing ({MINILM}, {ROTTEN}): run `make data` (make test does)")
    return MINILM


@pytest.fixture(scope="session")
def play_lines(corpus, tmp_path_factory):
    """Real labelled text: lines of Hamlet and of Twelfth Night, labelled with their play."""
    rows = []
    for play in ("hamlet", "twelfth_night"):
        lines = [line.strip() for line in (corpus / f"{play}_gut.txt").read_text().splitlines()]
        rows += [{"text": line, "play": play} for line in lines if len(line.split()) >= 5][:400]
    path = tmp_path_factory.mktemp("labelled") / "plays.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def plays_args(run_dir, prepared, lines, *overrides: str) -> list[str]:
    """A tiny BERT (fresh weights) telling the plays apart: the config of the resume and stage tests."""
    sets = [f"run.output_dir={run_dir}", "model.init_from=null", "model.type=bert", f"model.config={TINY_BERT}",
            f"tokenizer.path={MINILM}", f"data.sources=[{lines}]", "data.label_field=play", "data.labels=null",
            f"data.prepared_dir={prepared}", "data.seq_len=32", "data.validation_fraction=0.1",
            "data.test_fraction=0.1", "train.micro_batch_size=8", "train.global_batch_size=32", "train.max_steps=6",
            "optim.lr=1e-3", "optim.warmup_steps=1", "train.log_every=1", "eval.every=3",
            "train.precision=fp32", "checkpoint.every=3", "train.peak_tflops=0.2", *overrides]
    return [str(SENTIMENT)] + [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="session")
def sentiment_run(minilm, tmp_path_factory):
    """configs/finetune_sentiment.yaml, shortened: MiniLM on Rotten Tomatoes sentences, 2 ranks."""
    root = tmp_path_factory.mktemp("sentiment")
    sets = [f"run.output_dir={root / 'run'}", f"data.prepared_dir={root / 'prepared'}", "train.max_steps=40",
            "eval.every=20", "optim.warmup_steps=4", "optim.lr=3e-4", "optim.min_lr_ratio=0.1"]
    args = [a for s in sets for a in ("--set", s)]
    zerotrain("prepare", SENTIMENT, *args)
    zerotrain("train", SENTIMENT, *args)
    return root / "run"


@pytest.mark.slow
def test_fine_tuning_learns_sentiment(sentiment_run):
    summary = json.loads((sentiment_run / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.7 and summary["test_macro_f1"] > 0.65  # chance: 0.58 (all "fresh")
    info = LabelledData.load(sentiment_run.parent / "prepared").data
    confusion = np.array(summary["test_confusion_matrix"])
    assert confusion.sum() == info["splits"]["test"]["examples"]
    assert list(confusion.sum(1)) == list(info["splits"]["test"]["label_counts"].values())  # rows: true labels
    assert confusion.trace() / confusion.sum() == pytest.approx(summary["test_accuracy"])
    val = [r for r in read_metrics(sentiment_run) if "val/accuracy" in r]
    assert [r["step"] for r in val] == [20, 40]
    best = max(val, key=lambda r: r["val/accuracy"])  # the first of equals: only a better value moves "best"
    assert (sentiment_run / "checkpoints" / "best").read_text() == f"step_{best['step']:08d}"
    assert summary["test_step"] == best["step"]  # the test scores the best checkpoint


@pytest.mark.slow
def test_prediction_from_an_export(sentiment_run, tmp_path):
    zerotrain("export", sentiment_run, tmp_path / "export", "--tag", "best")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["id2label"] == {"0": "rotten", "1": "fresh"}
    reviews = tmp_path / "reviews.txt"
    reviews.write_text("a delightful, moving film with a wonderful cast and a smart script\n\n"
                       "a dull, tedious mess that wastes its talented cast\n")
    out = zerotrain("predict", tmp_path / "export", "--input", reviews).stdout.splitlines()
    assert [line.split("\t")[0] for line in out] == ["fresh", "rotten"]  # the empty line is skipped
    assert all(0.5 < float(line.split("\t")[1]) <= 1 for line in out)
    not_a_classifier = zerotrain("predict", tmp_path, "--input", reviews, check=False)
    assert not_a_classifier.returncode == 2 and "not a Hugging Face model folder" in not_a_classifier.stderr
    binary = subprocess.run([sys.executable, "-m", "launcher.cli", "predict", str(tmp_path / "export"), "--input",
                             "-"], input=bytes(range(128, 256)), capture_output=True, cwd=REPO)
    assert binary.returncode == 2 and binary.stderr.decode().strip().splitlines() == [
        "zerotrain: error: --input: standard input is not UTF-8 text; give texts, one per line"]


@pytest.fixture(scope="session")
def plays_prepared(minilm, play_lines, tmp_path_factory):
    prepared = tmp_path_factory.mktemp("plays") / "prepared"
    zerotrain("prepare", *plays_args(prepared.parent / "unused", prepared, play_lines))
    return prepared


@pytest.mark.slow
def test_classification_is_the_same_at_every_stage_and_resumes_exactly(plays_prepared, play_lines, tmp_path):
    prepared = plays_prepared
    runs = {stage: tmp_path / f"stage{stage}" for stage in (0, 3)}
    for stage, run_dir in runs.items():  # stage 3 built whole, as stage 0: the same initial weights
        zerotrain("train", *plays_args(run_dir, prepared, play_lines, f"zero.stage={stage}",
                                       "zero.partitioned_init=false"))
    assert train_losses(runs[0]) == pytest.approx(train_losses(runs[3]), abs=1e-5)
    # Resume from step 3: as if the run had stopped after that save.
    shutil.rmtree(runs[3] / "checkpoints" / "step_00000006")
    resumed = tmp_path / "resumed"
    shutil.copytree(runs[3], resumed, ignore=shutil.ignore_patterns("metrics.jsonl", "tensorboard", "summary.json"))
    zerotrain("train", *plays_args(resumed, prepared, play_lines, "zero.stage=3", "zero.partitioned_init=false"),
              "--resume", "auto")
    assert train_losses(resumed) == {step: loss for step, loss in train_losses(runs[3]).items() if step > 3}


@pytest.mark.slow
def test_a_lora_classifier_resumes_exactly_and_both_exports_predict_alike(minilm, plays_prepared, play_lines,
                                                                          tmp_path):
    """The tiny BERT, saved and read as init_from, with adapters at ZeRO 3 built partitioned and a fresh head
    trained fully (PEFT's modules_to_save): resumed from step 3 it logs the same losses (its dropout on from step 1:
    from_pretrained hands over a model in evaluation mode); the adapter (loaded on its base) and the merged export
    predict the same labels with the same probabilities."""
    base = tmp_path / "base"
    BertModel(BertConfig(**yaml.safe_load(TINY_BERT), vocab_size=len(load_tokenizer(minilm, require_eos=False)))) \
        .save_pretrained(base)
    lora = [f"model.init_from={base}", "model.config={}", "model.lora.rank=8", "zero.stage=3"]
    run = tmp_path / "run"
    zerotrain("train", *plays_args(run, plays_prepared, play_lines, *lora))
    assert "M trained: LoRA rank 8" in (run / "logs" / "rank0.log").read_text()
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("metrics.jsonl", "tensorboard", "summary.json",
                                                                "step_00000006"))
    (resumed / "checkpoints" / "latest").write_text("step_00000003")
    zerotrain("train", *plays_args(resumed, plays_prepared, play_lines, *lora), "--resume", "auto")
    assert train_losses(resumed) == {step: loss for step, loss in train_losses(run).items() if step > 3}
    zerotrain("export", run, tmp_path / "adapter")
    zerotrain("export", run, tmp_path / "merged", "--merge")
    lines = tmp_path / "lines.txt"
    lines.write_text("To be, or not to be, that is the question\nIf music be the food of love, play on\n")
    adapter, merged = (zerotrain("predict", tmp_path / name, "--input", lines).stdout.splitlines()
                       for name in ("adapter", "merged"))
    assert len(adapter) == 2 and [line.split("\t")[0] for line in adapter] == [line.split("\t")[0] for line in merged]
    assert [float(line.split("\t")[1]) for line in adapter] == \
        pytest.approx([float(line.split("\t")[1]) for line in merged], abs=1e-5)


@pytest.mark.slow
def test_early_stopping_ends_a_run_that_stopped_improving(plays_prepared, play_lines, tmp_path):
    run_dir = tmp_path / "run"
    # A learning rate too small to change a prediction: the validation accuracy of step 3 is never beaten.
    zerotrain("train", *plays_args(run_dir, plays_prepared, play_lines, "train.max_steps=12", "optim.lr=1e-12",
                                   "eval.best_metric=val/accuracy", "eval.early_stopping=2"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 9 and summary["test_step"] == 3  # validations at 3 (best), 6, 9: two without gain
    assert (run_dir / "checkpoints" / "best").read_text() == "step_00000003"
    assert "early stopping at step 9" in (run_dir / "logs" / "rank0.log").read_text()


@pytest.mark.slow
def test_fine_tuning_a_pretrained_export(tiny_run, play_lines, tmp_path):
    """pretrain -> export -> fine-tune: the tiny Llama of tiny_run gets a classification head, at ZeRO 3 built
    partitioned (deepspeed.zero.Init loading the export's weights), and its export labels text."""
    zerotrain("export", tiny_run, tmp_path / "pretrained")
    sets = [f"model.init_from={tmp_path / 'pretrained'}", "model.type=llama", "model.config={}",
            f"tokenizer.path={tmp_path / 'pretrained'}", "zero.stage=3", "zero.partitioned_init=true"]
    args = plays_args(tmp_path / "run", tmp_path / "prepared", play_lines, *sets)
    zerotrain("prepare", *args)
    zerotrain("train", *args)
    log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert "(classification)" in log and "model built partitioned" in log
    losses = train_losses(tmp_path / "run")
    assert all(np.isfinite(list(losses.values())))
    zerotrain("export", tmp_path / "run", tmp_path / "classifier")
    config = json.loads((tmp_path / "classifier" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert set(config["id2label"].values()) == {"hamlet", "twelfth_night"}
    lines = tmp_path / "lines.txt"
    lines.write_text("To be, or not to be, that is the question\nIf music be the food of love, play on\n")
    out = zerotrain("predict", tmp_path / "classifier", "--input", lines).stdout.splitlines()
    assert len(out) == 2 and all(line.split("\t")[0] in ("hamlet", "twelfth_night") for line in out)


def test_labels_map_to_ids_and_back(minilm, tmp_path):
    rows = [{"text": f"review number {i} says it was {word}", "stars": stars}
            for i, (word, stars) in enumerate([("bad", 1), ("fine", 2), ("great", 10)] * 20)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(sources=[str(tmp_path / "rows.jsonl")], label_field="stars", prepared_dir=tmp_path / "out",
                      seq_len=16, validation_fraction=0.2, test_fraction=0.2)
    labelled = prepare_labelled(data, minilm, log=lambda _: None)
    assert labelled.labels == ["1", "2", "10"]  # numbers in numeric order
    tokenizer = load_tokenizer(labelled.tokenizer_dir, require_eos=False)
    seen = 0
    for split in ("train", "validation", "test"):
        for example in labelled.split(split):
            text = tokenizer.decode(example["input_ids"], skip_special_tokens=True)
            name = labelled.labels[int(example["labels"])]
            assert {"1": "bad", "2": "fine", "10": "great"}[name] in text
            assert int(example["attention_mask"].sum()) == len(tokenizer(text)["input_ids"])
            seen += 1
    assert seen == len(rows)
    assert prepare_labelled(data, minilm, log=lambda _: None).data == labelled.data  # prepared once, then reused


@pytest.mark.parametrize("truncation, kept_words", [("head", "0 1 2 3 4 5 6 7"),
                                                    ("tail", "32 33 34 35 36 37 38 39"),
                                                    ("head+tail", "0 1 34 35 36 37 38 39")])
def test_a_long_text_keeps_its_head_its_tail_or_both(minilm, tmp_path, truncation, kept_words):
    """data.truncation: of 40 tokens, 8 fit between [CLS] and [SEP]; head+tail keeps a quarter from the start."""
    rows = [{"text": " ".join(str(i) for i in range(40)), "label": "long"}, {"text": "0 39", "label": "short"}] * 8
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(sources=[str(tmp_path / "rows.jsonl")], prepared_dir=tmp_path / "out", seq_len=10,
                      truncation=truncation, validation_fraction=0.01, test_fraction=0, validation=str(tmp_path /
                                                                                                         "rows.jsonl"))
    labelled = prepare_labelled(data, minilm, log=lambda _: None)
    tokenizer = load_tokenizer(labelled.tokenizer_dir, require_eos=False)
    long = next(e for e in labelled.split("train") if labelled.labels[int(e["labels"])] == "long")
    assert tokenizer.decode(long["input_ids"]) == f"[CLS] {kept_words} [SEP]"
    short = next(e for e in labelled.split("train") if labelled.labels[int(e["labels"])] == "short")
    assert tokenizer.decode(short["input_ids"], skip_special_tokens=True) == "0 39"
    assert labelled.data["splits"]["train"]["truncated"] == 8


@pytest.mark.parametrize("rows, settings, message", [
    ([{"text": "a fine film", "score": 1}], {}, "has no 'label' field (data.label_field)"),
    ([{"text": "a fine film", "label": "pos"}, {"text": "  ", "label": "neg"}], {}, "row 1: the text ('text') is empty"),
    ([{"text": f"film {i}", "label": "pos"} for i in range(20)] + [{"text": "other", "label": "neg"}],
     {"labels": ["pos", "meh"]}, "data.labels: 'meh' does not occur in the training split"),
])
def test_bad_labelled_data_is_named(minilm, tmp_path, rows, settings, message):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(sources=[str(tmp_path / "rows.jsonl")], prepared_dir=tmp_path / "out", seq_len=16, **settings)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare_labelled(data, minilm, log=lambda _: None)
    assert not (tmp_path / "out" / "labelled.json").exists()


def test_a_label_unseen_in_training_is_refused(minilm, tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"line {i}", "label": ["a", "b"][i % 2]}) + "\n"
                                                  for i in range(10)))
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": "new", "label": "c"}) + "\n")
    args = [str(SENTIMENT), "--set", f"data.sources=[{tmp_path / 'train.jsonl'}]", "--set", "data.label_field=label",
            "--set", "data.labels=null", "--set", f"data.validation={tmp_path / 'val.jsonl'}",
            "--set", f"data.prepared_dir={tmp_path / 'out'}"]
    result = zerotrain("prepare", *args, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"zerotrain: error: {tmp_path / 'val.jsonl'}: row 0: label 'c' does not occur in the training split; a model "
        "cannot learn it (list the labels to keep in data.labels)"]


def test_a_hub_model_name_is_read_from_the_hub(tmp_path):
    """A name that is no local folder is a Hub model (and its tokenizer): offline, one line says so."""
    result = zerotrain("prepare", SENTIMENT, "--set", "model.init_from=prajjwal1/bert-tiny", "--set",
                       f"data.prepared_dir={tmp_path / 'out'}", check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("zerotrain: error: prajjwal1/bert-tiny: cannot load a tokenizer (") \
        and len(result.stderr.strip().splitlines()) == 1


def test_scores_from_a_confusion_matrix():
    import torch

    from trainer.tasks.classification import scores

    result = scores(torch.tensor([[3.0, 1.0], [2.0, 4.0]]), loss=0.5)  # rows: true label, columns: predicted
    # F1 of label 0: 2*3 / (3+1 + 3+2) = 6/9; of label 1: 2*4 / (2+4 + 1+4) = 8/11
    assert result == pytest.approx({"loss": 0.5, "accuracy": 0.7, "macro_f1": (6 / 9 + 8 / 11) / 2})
