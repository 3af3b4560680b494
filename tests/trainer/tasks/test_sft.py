"""Supervised fine-tuning (model.task: sft): real ShareGPT conversations, SmolLM2's real tokenizer and ChatML
template, a tiny Llama (fresh weights, SmolLM2's vocabulary) so that a step takes a fraction of a second; real
ranks, real DeepSpeed."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MixtralConfig

from data_pipeline import ChatData, GlobalOrder
from data_pipeline.conversations import IGNORE
from helpers import REPO, read_metrics, refused, train_losses, zerotrain

SMOLLM = REPO / "data" / "models" / "SmolLM2-135M-Instruct"
SHAREGPT = REPO / "data" / "sharegpt" / "sharegpt.jsonl"
CONFIG = REPO / "configs" / "sft_smollm2.yaml"
SEQ_LEN = 256


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A 2-layer Llama with SmolLM2's tokenizer and chat template: what init_from reads."""
    if not (SMOLLM / "tokenizer.json").is_file() or not SHAREGPT.is_file():
        pytest.fail(f"{SMOLLM} or {SHAREGPT} is missing: run `make data` (make test does)")
    folder = tmp_path_factory.mktemp("chat-model") / "tiny-smollm"
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def chat_rows(tmp_path_factory):
    """The first 800 ShareGPT conversations, as they are (ShareGPT's field names, messy rows included)."""
    path = tmp_path_factory.mktemp("chat") / "sharegpt-800.jsonl"
    with open(SHAREGPT) as f:
        path.write_text("".join(line for _, line in zip(range(800), f)))
    return path


def sft_args(run_dir, prepared, model, rows, *overrides: str) -> list[str]:
    sets = [f"run.output_dir={run_dir}", f"model.init_from={model}", f"data.sources=[{rows}]",
            f"data.prepared_dir={prepared}", f"data.seq_len={SEQ_LEN}", "data.validation_fraction=0.1",
            "train.micro_batch_size=1", "train.global_batch_size=4", "train.max_steps=4", "train.precision=fp32",
            "train.log_every=1", "optim.lr=1e-3", "optim.warmup_steps=1", "eval.batches=2", "eval.every=2",
            "checkpoint.every=2", "launch.nproc_per_node=2", "zero.stage=2", "data.chat.sample_tokens=8",
            "train.peak_tflops=0.2", *overrides]
    return [str(CONFIG)] + [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="session")
def sft_run(tiny_chat_model, chat_rows, tmp_path_factory):
    """2 ranks, micro-batches of 1, accumulation 2: 4 steps, saves and validations at 2 and 4 (and at the start)."""
    root = tmp_path_factory.mktemp("sft")
    args = sft_args(root / "run", root / "prepared", tiny_chat_model, chat_rows)
    zerotrain("prepare", *args)
    zerotrain("train", *args)
    return root


def step_one(run_dir) -> dict:
    return next(r for r in read_metrics(run_dir) if r["step"] == 1 and "train/loss" in r)


@pytest.mark.slow
def test_the_prepared_chat_data_counts_what_it_left_out(sft_run):
    chat = ChatData.load(sft_run / "prepared")
    left_out = chat.data["left_out"]
    # Real ShareGPT: first turns longer than the sequence, conversations with no reply, empty turns.
    assert left_out["nothing to learn"] > 0 and left_out["no assistant turn"] > 0 and left_out["empty message"] > 0
    train = chat.data["splits"]["train"]
    assert train["tokens"] / (train["samples"] * SEQ_LEN) > 0.95  # best-fit decreasing: little padding
    labels = chat.split("train").array("labels")
    assert int((labels != IGNORE).sum()) == train["learned_tokens"] == int(chat.learned_tokens("train").sum())
    tokenizer = AutoTokenizer.from_pretrained(sft_run / "prepared" / "tokenizer")
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(SMOLLM).chat_template
    # Packed samples: positions restart at each conversation; a learned label is the next input token.
    positions = chat.split("train").array("position_ids")
    packed = int(np.argmax((positions[:, 1:] == 0).sum(1)))
    assert train["samples"] < train["examples"] and (positions[packed, 1:] == 0).sum() >= 2
    sample = chat.split("train")[packed]
    learned = sample["labels"][:-1] != IGNORE
    assert torch.equal(sample["labels"][:-1][learned], sample["input_ids"][1:][learned])


def first_step_losses(prepared, model_dir) -> tuple[list[float], list[int]]:
    """The summed cross-entropy of each of step 1's 4 samples' learned tokens, and their number, computed with
    plain transformers from the starting model."""
    samples = ChatData.load(prepared).split("train")
    order = GlobalOrder([len(samples)], [1.0], seed=1234)  # configs/sft_smollm2.yaml's run.seed
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sums, counts = [], []
    with torch.no_grad():
        for sample in (samples[order.sample(k)] for k in range(4)):
            logits = model(input_ids=sample["input_ids"][None], position_ids=sample["position_ids"][None],
                           use_cache=False).logits
            sums.append(float(F.cross_entropy(logits[0].float(), sample["labels"], reduction="sum")))
            counts.append(int((sample["labels"] != IGNORE).sum()))
    return sums, counts


@pytest.mark.slow
def test_the_loss_is_the_mean_over_the_steps_learned_tokens(sft_run, tiny_chat_model):
    """Step 1's logged loss is the cross-entropy of its 4 samples' learned tokens summed and divided by their
    number, computed here with plain transformers: not a mean of the micro-batches' means."""
    sums, counts = first_step_losses(sft_run / "prepared", tiny_chat_model)
    logged = step_one(sft_run / "run")["train/loss"]
    assert logged == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert len(set(counts)) > 1  # the samples learn different numbers of tokens: a mean of means would differ
    assert abs(np.mean([s / c for s, c in zip(sums, counts)]) - logged) > 1e-4


def test_packed_conversations_do_not_attend_to_each_other(tiny_chat_model):
    """Two conversations in one sample: the loss sft_loss computes is what each has alone (the positions restart,
    and the model keeps the conversations apart - transformers does only when it makes no cache)."""
    from data_pipeline.conversations import Example, lay_out
    from trainer.tasks.sft import sft_loss

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32).eval()
    examples = []
    for text in ("Friends, Romans, countrymen, lend me your ears.", "Now is the winter of our discontent."):
        ids = np.asarray(tokenizer(text)["input_ids"], np.int32)
        examples.append(Example(ids, np.append(ids[1:], IGNORE).astype(np.int32)))

    def loss(groups, restart=True):
        arrays = lay_out(examples, groups, 32, tokenizer.pad_token_id)
        batch = {k: torch.from_numpy(v).long() for k, v in arrays.items()} | {"loss_tokens": torch.ones(())}
        if not restart:  # one document: the second conversation would read the first
            batch["position_ids"] = torch.arange(32).expand(len(groups), 32)
        with torch.no_grad():
            return float(sft_loss(model, batch))

    assert loss([[0, 1]]) == pytest.approx(loss([[0], [1]]), abs=1e-5)
    assert abs(loss([[0, 1]], restart=False) - loss([[0], [1]])) > 1e-3


@pytest.mark.slow
def test_a_mixture_of_experts_fine_tunes_on_chats(tiny_chat_model, chat_rows, tmp_path):
    """A tiny Mixtral (4 experts, top-2) with SmolLM2's tokenizer at ZeRO 3: step 1 logs its learned tokens' mean
    loss as plain transformers computes it, the router's load-balancing loss apart, and the loss falls."""
    folder = tmp_path / "tiny-mixtral"
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           router_aux_loss_coef=0.02, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    args = sft_args(tmp_path / "run", tmp_path / "prepared", folder, chat_rows, "zero.stage=3", "eval.every=0",
                    "checkpoint.every=0")
    zerotrain("prepare", *args)
    zerotrain("train", *args)
    sums, counts = first_step_losses(tmp_path / "prepared", folder)
    first = step_one(tmp_path / "run")
    assert first["train/loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert 1 < first["train/router_aux_loss"] < 4 and "moe/layer1/load_max_mean" in first
    losses = train_losses(tmp_path / "run")
    assert losses[4] < losses[1]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [("--nproc", "1", "--set", "train.micro_batch_size=4"),
                                    ("--nproc", "1", "--set", "train.micro_batch_size=1"),
                                    ("--set", "parallel.sequence=2"),
                                    ("--set", "zero.stage=3", "--set", "eval.every=1", "--set",
                                     "data.chat.sample_prompts=1")])
def test_the_step_is_the_same_for_any_batching_and_ranks(layout, sft_run, tiny_chat_model, chat_rows, tmp_path):
    """1 rank x micro-batch 4, 1 rank x accumulation 4, 2 ranks sharing each sequence (parallel.sequence 2), ZeRO 3
    (which also generates a reply with partitioned weights, every rank taking part): the loss and the gradient (its
    norm) of the reference's 2 ranks x accumulation 2 at ZeRO 2."""
    args = sft_args(tmp_path / "run", sft_run / "prepared", tiny_chat_model, chat_rows, "train.max_steps=1",
                    "eval.every=0", "data.chat.sample_prompts=0")
    zerotrain("train", *args, *layout)
    got, reference = step_one(tmp_path / "run"), step_one(sft_run / "run")
    assert got["train/loss"] == pytest.approx(reference["train/loss"], rel=1e-6)
    assert got["train/grad_norm"] == pytest.approx(reference["train/grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_a_run_resumes_exactly_on_another_number_of_ranks(sft_run, tiny_chat_model, chat_rows, tmp_path):
    reference = sft_run / "run"
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed, ignore=shutil.ignore_patterns("metrics.jsonl", "tensorboard", "summary.json",
                                                                      "step_00000004"))
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    zerotrain("train", *sft_args(resumed, sft_run / "prepared", tiny_chat_model, chat_rows), "--nproc", "1",
              "--resume", "auto")
    expected = {step: loss for step, loss in train_losses(reference).items() if step > 2}
    assert train_losses(resumed) == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_validation_shows_the_replies_to_held_out_prompts(sft_run):
    run = sft_run / "run"
    val = [r for r in read_metrics(run) if "val/loss" in r]
    assert [r["step"] for r in val] == [0, 2, 4]  # eval.at_start: the starting weights first
    assert val[-1]["val/loss"] < val[0]["val/loss"]
    prompts = ChatData.load(sft_run / "prepared").prompts
    assert len(prompts) == 2 and all(p["text"].endswith("<|im_start|>assistant\n") for p in prompts)
    log = (run / "logs" / "rank0.log").read_text()
    for step in (0, 2, 4):
        assert f"step {step} samples/replies:\n> {prompts[0]['question'][:60]}" in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(val[-1]["val/loss"])


def test_bad_chat_data_is_refused_naming_the_row(tiny_chat_model, tmp_path):
    rows = tmp_path / "chat.jsonl"
    plain_names = ["data.chat={messages_field: messages, role_field: role, content_field: content}"]
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    cases = {
        "not a list": ({"messages": "Hi"}, "chat.jsonl: row 1: 'messages' is str, not a list of turns"),
        "empty turn": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
                       "chat.jsonl: row 1: turn 1 (assistant) is empty (data.chat.skip_invalid: true leaves such "
                       "rows out)"),
    }
    for name, (row, message) in cases.items():
        rows.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        args = sft_args(tmp_path / "run", tmp_path / f"prepared-{name.replace(' ', '-')}", tiny_chat_model, rows,
                        *plain_names)
        result = refused("prepare", *args)
        assert result.stderr.strip().splitlines() == [f"zerotrain: error: {rows.parent}/{message}"], name
    # Nothing to train on at all: every row left out, and said so.
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    result = refused("prepare", *sft_args(tmp_path / "run", tmp_path / "prepared-none", tiny_chat_model, rows,
                                          *plain_names))
    assert "no train conversation is left to train on (left out: 1 no assistant turn)" in result.stderr


@pytest.mark.slow
def test_chat_with_an_export(sft_run, tmp_path):
    """`zerotrain chat`: each line of --input a conversation of its own; at a terminal one conversation that goes
    on (its history rendered by the template each turn)."""
    export = tmp_path / "export"
    zerotrain("export", sft_run / "run", export)
    assert (export / "chat_template.jinja").is_file()
    messages = tmp_path / "messages.txt"
    messages.write_text("What is the capital of France?\n\nName three colours.\n")
    out = zerotrain("chat", export, "--input", messages, "--max-new-tokens", "4", "--system", "Be brief.").stdout
    assert [line for line in out.splitlines() if line.startswith("> ")] == \
        ["> What is the capital of France?", "> Name three colours."]  # the empty line is no message
    from launcher.chat import Chat

    chat, said = Chat(export, None, 4), []
    turns = iter(["Hi", "And then?", ""])
    chat.converse(read=lambda prompt: next(turns), write=said.append)
    assert len(said) == 2 and all(line.startswith("model> ") for line in said)
    not_a_chat_model = zerotrain("chat", REPO / "data" / "models" / "all-MiniLM-L6-v2", "--input", messages,
                                 check=False)
    assert not_a_chat_model.returncode == 2 and "its tokenizer has no chat template" in not_a_chat_model.stderr


@pytest.mark.slow
def test_lora_sft_at_zero_3_chats_alike_from_its_adapter_and_its_merged_export(sft_run, tiny_chat_model, chat_rows,
                                                                              tmp_path):
    """Adapters on the chat model, partitioned at ZeRO 3, with validation replies (generated by every rank through
    PEFT's model); `chat` loads the adapter on its base and the merged export alike."""
    run = tmp_path / "run"
    zerotrain("train", *sft_args(run, sft_run / "prepared", tiny_chat_model, chat_rows, "model.lora.rank=8",
                                 "model.lora.alpha=64", "zero.stage=3", "train.max_steps=2"))
    assert "step 2 samples/replies:\n> " in (run / "logs" / "rank0.log").read_text()
    messages = tmp_path / "messages.txt"
    messages.write_text("What is the capital of France?\nName three colours.\n")
    replies = []
    for kind in ("adapter", "merged"):
        zerotrain("export", run, tmp_path / kind, *(["--merge"] if kind == "merged" else []))
        replies.append(zerotrain("chat", tmp_path / kind, "--input", messages, "--max-new-tokens", "6").stdout)
    assert replies[0] == replies[1] and replies[0].count("> ") == 2


def test_the_plan_counts_an_sft_run_like_a_causal_lm_one():
    out = zerotrain("plan", CONFIG, "--nodes", "1", "--gpus-per-node", "2", "--gpu-memory", "24GB").stdout
    assert "llama, 134,515,008 parameters" in out  # SmolLM2-135M-Instruct, read from model.init_from
    assert "batch        8 x 512 = 4.10K tokens per step" in out


# Learning the last reply only, the samples learn very different numbers of tokens (69 to 214 in step 1), so the
# step's mean differs clearly from a mean of micro-batch means or of per-rank means.
STREAMING = ["data.mode=streaming", "data.chat.train_on=last_assistant", "eval.every=0", "eval.at_start=false",
             "checkpoint.every=2"]


@pytest.fixture(scope="session")
def streaming_sft_run(tiny_chat_model, chat_rows, tmp_path_factory):
    """The sft run's 4 steps on 2 ranks, its rows streamed (no prepare); saves at 2 and 4."""
    run_dir = tmp_path_factory.mktemp("sft-stream") / "run"
    zerotrain("train", *sft_args(run_dir, run_dir.parent / "unused", tiny_chat_model, chat_rows, *STREAMING))
    return run_dir


@pytest.mark.slow
def test_streaming_chat_trains_and_resumes_exactly(streaming_sft_run, tiny_chat_model, chat_rows, tmp_path):
    losses = train_losses(streaming_sft_run)
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    saved = torch.load(streaming_sft_run / "checkpoints" / "step_00000002" / "rank1.pt", weights_only=False)
    assert saved["stream"]["rank"] == 1 and saved["stream"]["world_size"] == 2 and saved["stream"]["pending"]
    resumed = tmp_path / "resumed"
    shutil.copytree(streaming_sft_run, resumed, ignore=shutil.ignore_patterns("metrics.jsonl", "tensorboard",
                                                                              "summary.json", "step_00000004"))
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    args = sft_args(resumed, tmp_path / "unused", tiny_chat_model, chat_rows, *STREAMING)
    zerotrain("train", *args, "--resume", "auto")
    assert train_losses(resumed) == {step: losses[step] for step in (3, 4)}  # exactly: the same samples, in order
    other_ranks = refused("train", *args, "--nproc", "1", "--resume", "auto")
    assert "streaming data resumes on ranks laid out the same only" in other_ranks.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sequence", [1, 2])
def test_a_streamed_step_loss_is_the_mean_over_its_learned_tokens(sequence, streaming_sft_run, tiny_chat_model,
                                                                   chat_rows, tmp_path):
    """Step 1's logged loss is the cross-entropy of the learned tokens of the 4 samples the data ranks streamed,
    summed and divided by their number, computed here with plain transformers. 2 ranks: 2 samples each, the
    count summed over them. parallel.sequence 2: the 2 ranks share one stream (4 samples), counted once."""
    from data_pipeline.streaming_chat import StreamingChatDataset
    from trainer.config import load_config

    run_dir = streaming_sft_run
    if sequence == 2:
        run_dir = tmp_path / "run"
        zerotrain("train", *sft_args(run_dir, tmp_path / "unused", tiny_chat_model, chat_rows, *STREAMING,
                                     "train.max_steps=1", "parallel.sequence=2"))
    cfg = load_config(next((run_dir / "checkpoints").glob("step_*/config.yaml")))
    ranks = cfg.layout.data_world
    streams = [itertools.islice(StreamingChatDataset([chat_rows], cfg.data, tiny_chat_model, rank, ranks,
                                                     cfg.run.seed), 4 // ranks) for rank in range(ranks)]
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32)
    sums, counts = np.zeros((ranks, 4 // ranks)), np.zeros((ranks, 4 // ranks))
    with torch.no_grad():
        for rank, stream in enumerate(streams):
            for i, sample in enumerate(stream):
                logits = model(input_ids=sample["input_ids"][None], position_ids=sample["position_ids"][None],
                               use_cache=False).logits
                sums[rank, i] = float(F.cross_entropy(logits[0].float(), sample["labels"], reduction="sum"))
                counts[rank, i] = int((sample["labels"] != IGNORE).sum())
    logged = step_one(run_dir)["train/loss"]
    assert logged == pytest.approx(sums.sum() / counts.sum(), rel=1e-5)
    assert abs((sums / counts).mean() - logged) > 1e-4  # not a mean of the micro-batches' means
    if ranks > 1:  # nor a mean of the ranks' means
        assert abs((sums.sum(1) / counts.sum(1)).mean() - logged) > 1e-4


def test_streaming_chat_refuses_validation_it_cannot_do(tiny_chat_model, chat_rows, tmp_path):
    for setting in ("eval.every=2", f"data.validation={chat_rows}"):
        args = sft_args(tmp_path / "run", tmp_path / "unused", tiny_chat_model, chat_rows, *STREAMING, setting)
        name = setting.split("=")[0]
        assert refused("train", *args).stderr.strip().splitlines() == [
            f"zerotrain: error: {name}: streaming chat data has no held-out conversations to validate on; unset "
            "it, or prepare the data (data.mode: prepared)"]
