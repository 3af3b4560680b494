"""Causal language modelling (trainer/tasks/causal_lm.py): data.document_masking trains a packed sample's
documents as if each were alone; the loss chunked over tokens equals the whole one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MambaConfig

from helpers import TINY, read_metrics, tiny_args, train_losses, zerotrain
from trainer.config import ConfigError, load_config
from trainer.model.shape import check_document_masking
from trainer.tasks.causal_lm import document_positions, lm_loss

EOS, VOCAB = 0, 50


def tiny_model(kind: str, attention: str):
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=EOS, eos_token_id=EOS)
        model = LlamaForCausalLM(config)
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=EOS, eos_token_id=EOS))
    model.set_attn_implementation(attention)
    return model.float().eval()


def packed(lengths: list[int], seq_len: int, generator: torch.Generator) -> list[int]:
    """seq_len + 1 tokens of documents (eos after each), the last one cut off as packing cuts it."""
    tokens = [t for n in lengths for t in torch.randint(1, VOCAB, (n,), generator=generator).tolist() + [EOS]]
    return tokens[:seq_len + 1]


def documents(sample: list[int]) -> list[list[int]]:
    """The sample's documents, each ending at (and including) its eos; the last may be cut."""
    pieces, current = [], []
    for token in sample:
        current.append(token)
        if token == EOS:
            pieces, current = pieces + [current], []
    return pieces + ([current] if current else [])


def separate_loss(model, samples: list[list[int]]) -> torch.Tensor:
    """The token-weighted mean loss of every document of the samples, each run through the model alone."""
    total, count = 0, 0
    for document in (d for s in samples for d in documents(s) if len(d) > 1):
        ids = torch.tensor([document])
        logits = model(input_ids=ids[:, :-1]).logits
        total = total + F.cross_entropy(logits.flatten(0, 1), ids[0, 1:], reduction="sum")
        count += len(document) - 1
    return total / count


def test_positions_restart_after_every_eos():
    inputs = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9], [EOS, 1, 2, 3, 4, 5, EOS, 1]])
    assert document_positions(inputs, EOS).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 0]]


@pytest.mark.parametrize("kind,attention", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")])
def test_a_packed_samples_loss_and_gradients_are_its_documents_run_separately(kind, attention):
    model, generator = tiny_model(kind, attention), torch.Generator().manual_seed(1)
    samples = [packed([7, 4, 12], 24, generator), packed([3, 30], 24, generator)]  # 4 documents, 2 of them cut
    batch = torch.tensor(samples)
    masked = lm_loss(model, batch, eos_id=EOS)
    masked_grads = torch.autograd.grad(masked, list(model.parameters()))
    alone = separate_loss(model, samples)
    alone_grads = torch.autograd.grad(alone, list(model.parameters()))
    assert masked.item() == pytest.approx(alone.item(), rel=1e-6, abs=1e-6)
    for got, want in zip(masked_grads, alone_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Off, a sample is one stream again: today's loss, which attends and predicts across documents.
    plain = F.cross_entropy(model(input_ids=batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten())
    torch.testing.assert_close(lm_loss(model, batch), plain, rtol=1e-6, atol=1e-7)  # the mean of per-token losses
    assert abs(plain.item() - masked.item()) > 1e-3


def test_models_that_cannot_keep_documents_apart_are_refused():
    check_document_masking(LlamaConfig())
    with pytest.raises(ConfigError, match="data.document_masking: model type mamba does not build its attention"):
        check_document_masking(MambaConfig())
    with pytest.raises(ConfigError, match="data.document_masking: applies to packed text"):
        load_config(TINY.parent / "finetune_sentiment.yaml", ["data.document_masking=true"])


@pytest.mark.slow
def test_a_masked_run_trains_validates_and_differs_from_the_unmasked_one(speeches_data, tmp_path):
    runs = {masking: tmp_path / f"masking_{masking}" for masking in ("true", "false")}
    for masking, run_dir in runs.items():
        zerotrain("train", *tiny_args(run_dir, speeches_data, f"data.document_masking={masking}", "train.max_steps=6"))
    masked, plain = train_losses(runs["true"]), train_losses(runs["false"])
    assert sorted(masked) == list(range(1, 7))
    assert all(abs(masked[s] - plain[s]) > 1e-3 for s in masked), (masked, plain)  # speeches: several per sample
    assert any("val/loss" in record for record in read_metrics(runs["true"]))


@pytest.mark.parametrize("dtype,masking", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_a_chunked_loss_gives_the_loss_and_gradients_of_the_whole_one(dtype, masking):
    """train.loss_chunk_tokens (chunks of 7 tokens of 2 x 32: uneven), plain and document-masked."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from trainer.tasks.causal_lm import lm_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                         num_attention_heads=2, num_key_value_heads=2,
                                                         vocab_size=512)).to(dtype)
    batch = torch.randint(1, 512, (2, 33))
    batch[:, 10] = 0  # an eos
    results = []
    for chunk in (None, 7):
        model.zero_grad()
        loss = lm_loss(model, batch, eos_id=0 if masking else None, chunk=chunk)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (whole, whole_grads), (chunked, chunked_grads) = results
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the summation order of the loss
    assert chunked.item() == pytest.approx(whole.item(), rel=tolerance)
    for a, b in zip(whole_grads, chunked_grads):
        torch.testing.assert_close(b.float(), a.float(), rtol=tolerance, atol=tolerance * 1e-2)


def test_the_loss_is_chunked_when_its_fp32_logits_would_be_large():
    from trainer.tasks.causal_lm import loss_chunk

    assert loss_chunk(4 * 2048, 128256, None) == 2**26 // (4 * 128256)  # 130 tokens: 64 MiB of fp32 logits
    assert loss_chunk(8 * 128, 8192, None) is None  # the demo: 32 MiB in all
    assert loss_chunk(8 * 128, 8192, 100) == 100 and loss_chunk(4 * 2048, 128256, 0) is None


@pytest.mark.slow
def test_a_run_with_a_chunked_loss_trains_the_losses_of_the_whole_one(tiny_run, tiny_data, tmp_path):
    """The real CLI at ZeRO 3 (built partitioned) on 2 ranks, the loss in chunks of 20 tokens (of 4 x 32), against
    tiny_run (ZeRO 2, whole loss)."""
    run_dir = tmp_path / "chunked"
    zerotrain("train", *tiny_args(run_dir, tiny_data, "zero.stage=3", "train.loss_chunk_tokens=20"))
    assert train_losses(run_dir) == pytest.approx(train_losses(tiny_run), rel=1e-5, abs=1e-6)
