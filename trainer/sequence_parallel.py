"""Ulysses sequence parallelism (parallel.sequence: N): the N ranks of a sequence group train the same samples,
each holding 1/N of every sequence; attention exchanges heads for sequence (all-to-all), so each rank attends
over the whole sequence with 1/N of the heads. Activations per rank fall by N.

DeepSpeed's `UlyssesSPAttentionHF` does the exchange inside transformers' attention. The rest is zerotrain's:
- Each rank cuts its slice from the whole sample after the labels are shifted and the positions counted (the
  token after a slice boundary lives on the next rank; positions restart at documents).
- DeepSpeed is told nothing of the sequence groups: it sees a data-parallel world of every rank, so ZeRO
  partitions, checkpoints (their file layout) and universal conversion are a plain run's, and a run resumes
  at another sequence degree without conversion. It averages gradients over all ranks while a sample's
  gradient is the sum of its slices' gradients: each slice's gradient is scaled by N to make up for it.
  (Told of the groups, DeepSpeed 0.19.8 at ZeRO 3 divides gradients by the whole world anyway: 1/N too small.)
- Under sdpa, DeepSpeed drops the attention mask and attends plain-causally over the gathered sequence; with
  data.document_masking zerotrain builds the per-document mask from the gathered positions instead.
  flash-attention reads the gathered positions itself (variable-length kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
from transformers import PretrainedConfig
from transformers.masking_utils import find_packed_sequence_indices
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from trainer.model import attention_of


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


def setup(config: PretrainedConfig, size: int, micro_batch_size: int, seq_len: int,
          document_masking: bool) -> SequenceShard | None:
    """The sequence groups (consecutive ranks: 0..N-1, N..2N-1, ...), and the model's attention split over
    them. None when parallel.sequence is 1. Every rank calls it: creating groups is collective."""
    if size == 1:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = [dist.new_group(list(range(first, first + size))) for first in range(0, world, size)]
    group = groups[rank // size]
    attention = attention_of(config)
    core = ALL_ATTENTION_FUNCTIONS[attention]
    if document_masking and attention == "sdpa":
        core = _documents_kept_apart(core)
    split = UlyssesSPAttentionHF(core, batch_size=micro_batch_size, attn_head_count=config.num_attention_heads,
                                 attn_head_size=getattr(config, "head_dim", None)
                                 or config.hidden_size // config.num_attention_heads,
                                 kv_head_count=getattr(config, "num_key_value_heads", None)
                                 or config.num_attention_heads,
                                 num_hidden_layers=config.num_hidden_layers, process_group=group,
                                 local_seq_length=seq_len // size, global_seq_length=seq_len)
    split.core_attn_implementation = attention

    def attend(module, query, key, value, attention_mask, *args, **kwargs):
        # transformers built the mask for this rank's slice: meaningless over the gathered sequence
        return split(module, query, key, value, None, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[attention] = attend
    return SequenceShard(rank % size, size, group)


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
