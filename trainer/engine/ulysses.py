"""DeepSpeed's Ulysses attention for a sequence group (trainer/parallel/sequence.py): heads exchanged for
sequence (all-to-all) around transformers' attention kernel."""

from __future__ import annotations

from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
from transformers import PretrainedConfig


def split_attention(core, attention: str, config: PretrainedConfig, group, micro_batch_size: int, seq_len: int,
                    size: int) -> UlyssesSPAttentionHF:
    """`core` (the `attention` kernel, transformers' signature) over the whole sequence of `group`'s `size` ranks,
    each holding seq_len / size tokens of it."""
    heads = config.num_attention_heads
    split = UlyssesSPAttentionHF(core, batch_size=micro_batch_size, attn_head_count=heads,
                                 attn_head_size=getattr(config, "head_dim", None) or config.hidden_size // heads,
                                 kv_head_count=getattr(config, "num_key_value_heads", None) or heads,
                                 num_hidden_layers=config.num_hidden_layers, process_group=group,
                                 local_seq_length=seq_len // size, global_seq_length=seq_len)
    split.core_attn_implementation = attention
    return split
