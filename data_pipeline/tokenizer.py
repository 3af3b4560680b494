"""Train, load and identify the tokenizer: byte-level BPE, so any text (any language, any bytes) encodes."""
import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data_pipeline.errors import DataError

EOT = "<|endoftext|>"  # GPT-2's document separator; doubles as bos and pad so the vocab has one special token


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],  # listed first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknown tokens, ever
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT, pad_token=EOT)


def load_tokenizer(path: str | Path, require_eos: bool = True) -> PreTrainedTokenizerFast:
    """A folder, or a Hub name (downloaded; needs the internet). `require_eos`: packing documents for
    pretraining needs a separator; classification does not."""
    if Path(path).is_absolute() and not Path(path).is_dir():  # a relative path is a Hub name
        raise DataError(f"{path}: no such tokenizer folder")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from e
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise DataError(f"{path}: not a fast (tokenizers-backed) tokenizer: {type(tok).__name__}")
    if require_eos and tok.eos_token_id is None:
        raise DataError(f"{path}: tokenizer has no eos token, needed to separate documents")
    return tok


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()
