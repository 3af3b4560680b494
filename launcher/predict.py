"""Label texts with an exported classifier, batch-wise, with plain transformers: what a user of the export does."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils.logging import disable_progress_bar

from data_pipeline.errors import UserError
from launcher.models import export_config, load_export


def predict(model_dir: Path, texts: Iterable[str], batch_size: int) -> Iterator[tuple[str, float, str]]:
    """(label, its probability, text) per non-empty text, in input order; the label names are the export's."""
    config = export_config(model_dir)
    if not any(name.endswith("ForSequenceClassification") for name in config.architectures or []):
        raise UserError(f"{model_dir}: not a classifier ({', '.join(config.architectures or ['no architecture'])}); "
                          "export a run with model.task: classification")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    disable_progress_bar()  # the labels are the output; a loading bar on stderr is not
    model = load_export(model_dir, AutoModelForSequenceClassification)
    max_length = min(tokenizer.model_max_length, getattr(config, "max_position_embeddings", 512))
    texts = (text for text in texts if text.strip())
    while batch := list(itertools.islice(texts, batch_size)):  # itertools.batched needs Python 3.12
        inputs = tokenizer(list(batch), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        with torch.no_grad():
            probabilities = model(**inputs).logits.float().softmax(-1)
        scores, ids = probabilities.max(-1)
        for text, score, i in zip(batch, scores.tolist(), ids.tolist()):
            yield config.id2label[i], score, text
