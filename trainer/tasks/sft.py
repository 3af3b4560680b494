"""Supervised fine-tuning of chat models: next-token prediction on conversations, learning only the replies.

Data: chat samples prepared by `zerotrain prepare` (data_pipeline.conversations: the model's own chat template,
the learned tokens marked, several conversations packed per sample and kept apart by restarting positions), or
made the same way on the fly from a stream of the rows (data.mode: streaming; data_pipeline.streaming_chat). The
loss is the cross-entropy summed over the learned tokens of the whole optimizer step and divided by their
number (trainer/data.py ChatSamples, ChatStream), so micro-batch size, accumulation, the number of ranks and
sequence parallelism change nothing. Validation (prepared data only): the held-out conversations' loss per learned
token, and the replies the model gives to a few held-out prompts (TensorBoard text and the log), so a user sees the
model change.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from data_pipeline import ChatData, eval_batches, load_tokenizer
from data_pipeline.conversations import prepare_chat
from trainer.config import Config, ConfigError
from trainer.data import ChatSamples, ChatStream, TrainingData
from trainer.parallel.distributed import Rank, to_device
from trainer.tasks.causal_lm import CausalLM, fp32_cross_entropy, loss_chunk, token_losses

log = logging.getLogger("zerotrain")


class SFT(CausalLM):
    name = "sft"
    reads_model_tokenizer = True

    def fill_defaults(self, raw: dict) -> None:
        super().fill_defaults(raw)
        data = raw.get("data")
        if isinstance(data, dict):  # conversations are packed apart, always
            data.setdefault("document_masking", True)

    def check_config(self, cfg: Config) -> None:
        super().check_config(cfg)
        if cfg.model.init_from is None or cfg.tokenizer.path is None:
            raise ConfigError("model.init_from: supervised fine-tuning starts from a chat model (a folder with its "
                              "tokenizer and chat template)")
        if cfg.data.mode == "streaming":
            _check_streaming(cfg)
        if not cfg.data.document_masking:
            raise ConfigError("data.document_masking: sft keeps each conversation apart; leave it true")
        if any(source.weight is not None for source in cfg.data.sources):
            raise ConfigError("data.sources: sft reads its sources as one set of conversations; drop the weights")

    def prepare(self, cfg: Config, part: tuple[int, int]) -> None:
        prepare_chat(cfg.data, cfg.tokenizer.path)

    def open_data(self, cfg: Config) -> TrainingData:
        if cfg.data.mode == "streaming":
            return ChatStream(cfg)
        return ChatSamples(ChatData.load(cfg.data.prepared_dir))

    def check_data(self, cfg: Config, data: TrainingData) -> None:
        if not isinstance(data, ChatSamples):
            return
        if data.chat.data["seq_len"] != cfg.data.seq_len:
            raise ConfigError(f"data.seq_len: {cfg.data.seq_len}, but the chat data was prepared for "
                              f"{data.chat.data['seq_len']}; prepare it again")
        validation_batches(data.chat, cfg)

    def meta_inputs(self, micro_batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        ids = torch.zeros(micro_batch_size, seq_len, dtype=torch.long, device="meta")
        return {"input_ids": ids, "position_ids": ids}

    def loss(self, cfg: Config, data: TrainingData, shard) -> Callable:
        return partial(sft_loss, shard=shard,
                       chunk=loss_chunk(cfg.rank_tokens, data.vocab_size, cfg.train.loss_chunk_tokens),
                       cross_entropy=torch.compile(fp32_cross_entropy) if cfg.train.compile else fp32_cross_entropy)

    def validation(self, cfg: Config, data: TrainingData, rank: Rank, loss: Callable):
        if not isinstance(data, ChatSamples):  # a stream has no held-out split
            return None
        return ChatValidation(data, validation_batches(data.chat, cfg), cfg, rank, loss)


def _check_streaming(cfg: Config) -> None:
    """A stream has no held-out conversations: validation settings are refused, not ignored."""
    asked = {"data.validation": cfg.data.validation, "eval.every": cfg.eval.every, "eval.at_start": cfg.eval.at_start,
             "eval.best_metric": cfg.eval.best_metric}
    for name, value in asked.items():
        if value:
            raise ConfigError(f"{name}: streaming chat data has no held-out conversations to validate on; unset it, "
                              "or prepare the data (data.mode: prepared)")


def sft_loss(model, batch: dict[str, torch.Tensor], shard=None, chunk: int | None = None,
             cross_entropy: Callable = fp32_cross_entropy) -> torch.Tensor:
    """The learned tokens' cross-entropy summed, over batch["loss_tokens"]. With `shard`, this rank's slice of
    every sequence (labels and positions were made for the whole sequence: cut like the inputs)."""
    inputs, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    if shard is not None:
        inputs, labels, positions = shard.cut(inputs), shard.cut(labels), shard.cut(positions)
    # No cache: transformers keeps documents apart where positions restart only when it makes none
    logits = model(input_ids=inputs, position_ids=positions, use_cache=False).logits
    part = token_losses(logits, labels, chunk, cross_entropy).sum() / batch["loss_tokens"]
    return part if shard is None else shard.whole(part)


def validation_batches(chat: ChatData, cfg: Config) -> int:
    """Validation micro-batches over all data-parallel ranks: at most eval.batches, a multiple of their number
    (a ZeRO-3 forward is a collective: every rank runs as many)."""
    world, available = cfg.layout.data_world, chat.rows("validation") // cfg.train.micro_batch_size
    count = min(cfg.eval.batches, available) // world * world
    if not count:
        raise ConfigError(f"data.validation_fraction: the validation split holds {available} micro-batch(es) of "
                          f"{cfg.train.micro_batch_size} samples, fewer than the {world} ranks; raise it (and "
                          "prepare again), or lower train.micro_batch_size")
    return count


class ChatValidation:
    """The loss per learned token of the first eval.batches held-out micro-batches, and replies to the held-out
    prompts chat.json keeps (data.chat.sample_prompts)."""

    tests = False

    def __init__(self, data: ChatSamples, count: int, cfg: Config, rank: Rank, loss: Callable):
        self.samples, self.rank, self.loss = data.chat.split("validation"), rank, loss
        self.batches = eval_batches(len(self.samples), cfg.train.micro_batch_size, rank.data_rank, rank.data_world,
                                    count)
        # Sequence parallelism splits attention over the group: generate() would run a slice of the prompt.
        self.prompts = data.chat.prompts if cfg.layout.sequence == 1 else []
        self.max_new_tokens, self.eos_id, self.pad_id = cfg.data.chat.sample_tokens, data.eos_id, data.pad_token_id
        self.tokenizer = load_tokenizer(data.tokenizer_dir) if self.prompts else None

    def run(self, engine) -> dict:
        totals = torch.zeros(2, dtype=torch.float64, device=self.rank.device)  # loss sum, learned tokens
        with engine.evaluating():
            for indices in self.batches:
                batch = to_device(default_collate([self.samples[i] for i in indices]), self.rank.device)
                learned = (batch["labels"] >= 0).sum()
                totals += torch.stack([self.loss(engine, {**batch, "loss_tokens": torch.ones(())}).double(),
                                       learned.double()])
            replies = self._replies(engine)
        # Ranks of a sequence group evaluate the same batches: each counts them, which the ratio cancels.
        dist.all_reduce(totals)
        loss = float(totals[0] / totals[1].clamp(min=1))
        return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50)), **replies}

    def _replies(self, engine) -> dict[str, str]:
        """Greedy replies to the held-out prompts. Every rank generates (a ZeRO-3 forward is a collective)."""
        if not self.prompts:
            return {}
        tokenizer, lines = self.tokenizer, []
        for prompt in self.prompts:
            ids = torch.tensor([tokenizer(prompt["text"], add_special_tokens=False)["input_ids"]],
                               device=self.rank.device)
            out = engine.module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=self.max_new_tokens, eos_token_id=self.eos_id,
                                         pad_token_id=self.pad_id, synced_gpus=dist.get_world_size() > 1)
            reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
            lines.append(f"> {prompt['question'][:200]}\n{reply}")
        return {"samples/replies": "\n\n".join(lines)}
