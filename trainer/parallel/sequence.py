"""Ulysses sequence parallelism (parallel.sequence: N): the N ranks of a sequence group train the same samples,
each holding 1/N of every sequence; attention exchanges heads for sequence (all-to-all), so each rank attends
over the whole sequence with 1/N of the heads. Activations per rank fall by N.

DeepSpeed's `UlyssesSPAttentionHF` does the exchange inside transformers' attention (trainer/engine/ulysses.py).
The rest is zerotrain's:
- Each rank cuts its slice from the whole sample after the labels are shifted and the positions counted (the
  token after a slice boundary lives on the next rank; positions restart at documents).
- DeepSpeed is told nothing of the sequence groups: it sees a data-parallel world of every rank, so ZeRO
  partitions, checkpoints (their file layout) and universal conversion are a plain run's, and a run resumes
  at another sequence degree without conversion. It averages gradients over all ranks while a sample's
  gradient is the sum of its slices' gradients: each slice's gradient is scaled by N to make up for it.
  (Told of the groups, DeepSpeed at ZeRO 3 divides gradients by the whole world anyway: 1/N too small.)
- Under sdpa, DeepSpeed drops the attention mask and attends plain-causally over the gathered sequence; with
  data.document_masking zerotrain builds the per-document mask from the gathered positions instead.
  flash-attention reads the gathered positions itself (variable-length kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import PretrainedConfig
from transformers.masking_utils import find_packed_sequence_indices
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from trainer.engine.ulysses import split_attention
from trainer.model.shape import attention_of
from trainer.parallel.layout import ParallelLayout


@dataclass
class SequenceShard:
    """This rank's slice of every sequence: rank `rank` of `size` in the sequence group `group`."""

    rank: int
    size: int
    group: object

    def cut(self, tensor: torch.Tensor) -> torch.Tensor:
        length = tensor.shape[1] // self.size
        return tensor[:, self.rank * length:(self.rank + 1) * length]

    def whole(self, part: torch.Tensor) -> torch.Tensor:
        """The sample's loss from this slice's share `part` (its tokens' loss sum over the sample's token
        count): the value is the whole loss (summed over the group), the gradient `part`'s, scaled by the
        group's size (DeepSpeed averages over every rank)."""
        whole = part.detach().clone()
        dist.all_reduce(whole, group=self.group)
        return self.size * part + (whole - self.size * part.detach())


def setup(config: PretrainedConfig, layout: ParallelLayout, micro_batch_size: int, seq_len: int,
          document_masking: bool) -> SequenceShard | None:
    """The sequence groups (the layout's consecutive ranks), and the model's attention split over them. None
    without sequence parallelism. Every rank calls it: creating groups is collective."""
    if layout.sequence == 1:
        return None
    rank = dist.get_rank()
    groups = [dist.new_group(ranks) for ranks in layout.groups()]
    group = groups[layout.data_rank(rank)]
    attention = attention_of(config)
    core = ALL_ATTENTION_FUNCTIONS[attention]
    if document_masking and attention == "sdpa":
        core = _documents_kept_apart(core)
    split = split_attention(core, attention, config, group, micro_batch_size, seq_len, layout.sequence)

    def attend(module, query, key, value, attention_mask, *args, **kwargs):
        # transformers built the mask for this rank's slice: meaningless over the gathered sequence
        return split(module, query, key, value, None, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[attention] = attend
    return SequenceShard(rank % layout.sequence, layout.sequence, group)


def _documents_kept_apart(core):
    """sdpa over the gathered sequence, attending only within each document, which transformers finds where
    the positions restart (as it does without a sequence split); no mask when every sample is one document.
    Every layer gathers the same positions: one mask serves them all (sdpa keeps it for backward)."""
    last = {"positions": None, "mask": None}

    def attend(module, query, key, value, attention_mask, *args, **kwargs):
        positions = kwargs["position_ids"]  # gathered over the group by UlyssesSPAttentionHF
        if last["positions"] is None or not torch.equal(last["positions"], positions):
            document = find_packed_sequence_indices(positions)
            mask = None if document is None else (document[:, :, None] == document[:, None, :]) & torch.ones(
                positions.shape[-1], positions.shape[-1], dtype=torch.bool, device=positions.device).tril()
            last.update(positions=positions, mask=None if mask is None else mask[:, None])
        return core(module, query, key, value, last["mask"], *args, **kwargs)
    return attend
