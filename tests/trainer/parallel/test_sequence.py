"""parallel.sequence (Ulysses): 2 ranks sharing every sample's sequence train the losses of 1 rank with the same
global batch, at ZeRO 1-3, with and without document masking; checkpoints resume at another degree."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from helpers import STEPS, TINY, as_of_step_6, read_metrics, resumed_like, tiny_args, train_losses, zerotrain
from live_tensors import split_activations
from trainer.config import ConfigError, load_config
from trainer.model.shape import check_sequence_split

# fp32; the order in which gradients are summed differs between the layouts (measured: within 1e-6)
TOLERANCE = 1e-5


def val_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in read_metrics(run_dir) if "val/loss" in r}


def trained(prepared, run_dir, *settings: str, ranks: int = 2):
    zerotrain("train", *tiny_args(run_dir, prepared, *settings), "--nproc", str(ranks))
    return run_dir


@pytest.fixture(scope="module")
def split_run(speeches_data, tmp_path_factory):
    """Sequence parallel over 2 ranks, documents masked, ZeRO 2: saved at steps 6 and 12."""
    return trained(speeches_data, tmp_path_factory.mktemp("sp") / "split", "parallel.sequence=2",
                   "data.document_masking=true")


@pytest.mark.slow
@pytest.mark.parametrize("stage,masking", [(1, "true"), (2, "true"), (3, "true"), (2, "false")])
def test_a_sequence_split_over_two_ranks_trains_the_losses_of_one_rank(stage, masking, speeches_data, split_run,
                                                                      tmp_path):
    settings = [f"zero.stage={stage}", f"data.document_masking={masking}"]  # ZeRO 3 built partitioned
    alone = trained(speeches_data, tmp_path / "alone", *settings, ranks=1)
    split = split_run if (stage, masking) == (2, "true") else \
        trained(speeches_data, tmp_path / "split", *settings, "parallel.sequence=2")
    expected, got = train_losses(alone), train_losses(split)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([expected[s] for s in sorted(got)], abs=TOLERANCE)
    assert val_losses(split) and val_losses(split) == pytest.approx(val_losses(alone), abs=TOLERANCE)
    if (stage, masking) == (2, "true"):  # its checkpoint is a plain one: it exports 1 rank's model
        for run_dir in (alone, split):
            zerotrain("export", run_dir, tmp_path / f"{run_dir.name}-export")
        ids = torch.arange(1, 20).unsqueeze(0)
        logits = [AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}-export")(input_ids=ids).logits
                  for name in (alone.name, split.name)]
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("ranks,sequence", [(2, 1), (1, 1)])
def test_a_sequence_parallel_run_resumes_without_it(ranks, sequence, speeches_data, split_run, tmp_path):
    """Saved with the sequence split over 2 ranks; resumed by 2 data-parallel ranks (the same files: no
    conversion) and by 1 rank (through a universal checkpoint), exactly where it stood."""
    resumed = as_of_step_6(split_run, tmp_path / "resumed")
    result = zerotrain("train", *tiny_args(resumed, speeches_data, "data.document_masking=true",
                                           f"parallel.sequence={sequence}"), "--nproc", str(ranks), "--resume", "auto")
    assert ("universal checkpoint" in result.stdout) == (ranks == 1)
    assert resumed_like(resumed, split_run, TOLERANCE)


@pytest.mark.slow
def test_the_plan_counts_a_ranks_activations_under_a_sequence_split():
    """Within 15% (like the stage estimates): what rank 0 of 2 keeps for backward against trainer/memory.py."""
    for masking in (False, True):
        kept = split_activations(TINY, ["model.config.max_position_embeddings=1024"], 2, masking, 512)
        ratio = kept["measured"] / kept["estimated"]
        print(f"sequence split over 2 ranks, document masking {masking}: measured / estimated {ratio:.3f}")
        assert abs(ratio - 1) <= 0.15, (masking, kept)


def test_attention_that_cannot_be_split_is_refused():
    check_sequence_split(LlamaConfig(num_attention_heads=4, num_key_value_heads=2), 2)
    check_sequence_split(LlamaConfig(num_attention_heads=8, num_key_value_heads=2), 4)  # kv heads replicated
    with pytest.raises(ConfigError, match="parallel.sequence: 4 does not divide the model's 6 attention heads"):
        check_sequence_split(LlamaConfig(hidden_size=384, num_attention_heads=6, num_key_value_heads=6), 4)
    with pytest.raises(ConfigError, match="parallel.sequence: 4 and the model's 6 key/value heads"):
        check_sequence_split(LlamaConfig(hidden_size=384, num_attention_heads=12, num_key_value_heads=6), 4)
    with pytest.raises(ConfigError, match="parallel.sequence: eager attention cannot be split"):
        check_sequence_split(LlamaConfig(attn_implementation="eager"), 2)
    with pytest.raises(ConfigError, match="parallel.sequence: splits the sequences of packed text"):
        load_config(TINY.parent / "finetune_sentiment.yaml", ["parallel.sequence=2"])
