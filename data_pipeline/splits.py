"""Held-out splits chosen by a hash of the text: the same document lands in the same split whatever the file
names, order, chunking or machine, and a duplicated document never lands in two splits."""
import hashlib


def split_of(text: str, fractions: dict[str, float]) -> str:
    """The split of `text`: each held-out split of `fractions` takes its share of the hash range, in order;
    the rest is "train"."""
    u = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
    for split, fraction in fractions.items():
        if u < fraction:
            return split
        u -= fraction
    return "train"
