"""Checkpoints written by an earlier zerotrain still resume and export: a tiny run's step-2 checkpoint (2 ranks,
ZeRO 2, fp32) and its prepared data, committed in tests/fixtures/checkpoint_v1 with what that version logged
and exported (expected.json)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import REPO, train_losses, zerotrain

FIXTURE = REPO / "tests" / "fixtures" / "checkpoint_v1"


@pytest.mark.slow
def test_a_checkpoint_of_the_first_format_exports_and_resumes_to_the_losses_it_had(tmp_path):
    copy = shutil.copytree(FIXTURE, tmp_path / "v1")
    expected = json.loads((copy / "expected.json").read_text())
    zerotrain("export", copy / "run", tmp_path / "export", "--prepared-dir", copy / "prepared")  # it moved
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(expected["input_ids"])).logits[:, -1]
    assert torch.allclose(logits, torch.tensor(expected["last_logits"]), atol=1e-5)

    sets = [f"run.output_dir={copy / 'run'}", f"data.prepared_dir={copy / 'prepared'}",
            f"data.sources=[{copy / 'text.jsonl'}]"]
    zerotrain("train", copy / "run" / "config.yaml", *[a for s in sets for a in ("--set", s)], "--resume", "auto")
    losses = train_losses(copy / "run")
    assert sorted(losses) == [3, 4]
    assert [losses[3], losses[4]] == pytest.approx([expected["losses"]["3"], expected["losses"]["4"]], abs=1e-6)
