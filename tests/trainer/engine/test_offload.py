"""ZeRO offload, real 2-rank runs through the CLI: optimizer states to cpu memory (stages 1-3) or to NVMe swap
files (stage 3), parameters to cpu memory or NVMe (stage 3). Offloading moves tensors, not arithmetic: every run
must train exactly like the same config without offload."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from helpers import STEPS, read_metrics, tiny_args, train_losses, zerotrain
from trainer.config import load_config
from trainer.engine.nvme import async_io_available, build_async_io

pytestmark = pytest.mark.slow

# Measured on CPU (fp32, 2 ranks, DeepSpeed 0.19.8): every offloaded run below gives the losses of its
# non-offloaded twin to within 5e-8 relative (one float32 rounding of the logged mean, at some steps; most are
# bit-identical) - the same fp32 master weights, gradients and AdamW arithmetic (torch's AdamW, on the CPU either
# way); offload only changes where tensors wait between uses. The tolerance is the one test_train.py allows
# between ZeRO stages, 200x the measured spread and far below a real bug (a lost step or stale parameters or
# moments move the loss in the third decimal within a step or two).
TOLERANCE = {"rel": 1e-5, "abs": 1e-6}


@pytest.mark.parametrize("stage,offload", [
    (1, ["zero.offload_optimizer=cpu"]),
    (2, ["zero.offload_optimizer=cpu"]),
    # Stage 3 built whole (as at stages 1-2): the same initial weights as the stage-2 reference run.
    (3, ["zero.offload_optimizer=cpu", "zero.offload_param=cpu", "zero.partitioned_init=false"]),
])
def test_cpu_offload_trains_like_no_offload(stage, offload, tiny_run, tiny_data, tmp_path):
    run_dir = tmp_path / f"stage{stage}-cpu"
    zerotrain("train", *tiny_args(run_dir, tiny_data, f"zero.stage={stage}", *offload))
    got = train_losses(run_dir)
    assert list(got) == list(range(1, STEPS + 1))
    assert got == pytest.approx(train_losses(tiny_run), **TOLERANCE)


# DeepSpeed swaps to NVMe only tensors of at least 1 MiB (smaller ones stay in memory): the tiny model with
# 8192-wide MLPs (6.6M parameters) has 1M-element MLP weights, whose halves (one per rank) are 2 MiB in fp32, and
# 3.3M-element optimizer partitions. A few steps suffice: every step reads and writes every swapped tensor.
# Validation and a checkpoint in the middle: training goes on after a forward-only pass and a save (which copies
# the optimizer's swap files into the checkpoint).
NVME_MODEL = ["zero.stage=3", "model.config.hidden_size=128", "model.config.intermediate_size=8192",
              "train.max_steps=4", "optim.warmup_steps=1", "eval.every=2", "checkpoint.every=2"]


@pytest.fixture(scope="module")
def async_io():
    """DeepSpeed's async_io op, built (the first build JIT-compiles for minutes, outside any run's timeout).
    Skips only where libaio is missing and cannot be installed (no root or no apt-get)."""
    if not async_io_available():
        _install_libaio()
    if not async_io_available():
        pytest.fail("libaio-dev is installed but DeepSpeed's async_io op still finds no libaio")
    build_async_io()


def val_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in read_metrics(run_dir) if "val/loss" in r}


def _install_libaio() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("NVMe offload needs DeepSpeed's async_io op: libaio is missing and cannot be installed here "
                    "(no root or no apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]  # another apt run on the machine: wait, do not fail
    for cmd in (["apt-get", "update", "-qq", *lock],
                ["apt-get", "install", "-y", "-qq", *lock, "--no-install-recommends", "libaio-dev"]):
        result = subprocess.run(cmd, text=True, capture_output=True, env=env, timeout=900)
        if result.returncode != 0:
            pytest.fail(f"cannot install libaio-dev: {' '.join(cmd)} exited {result.returncode}:\n"
                        f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")


def test_nvme_offload_of_optimizer_and_parameters_trains_like_no_offload(async_io, tiny_data, tmp_path):
    """Stage 3, fp32, built partitioned (zero.Init: the default): both offloads to NVMe in one run."""
    reference, run_dir, nvme = tmp_path / "no-offload", tmp_path / "nvme", tmp_path / "swap"
    zerotrain("train", *tiny_args(reference, tiny_data, *NVME_MODEL))
    zerotrain("train", *tiny_args(run_dir, tiny_data, *NVME_MODEL, "zero.offload_optimizer=nvme",
                                  "zero.offload_param=nvme", f"zero.nvme_path={nvme}"))
    got = train_losses(run_dir)
    assert list(got) == [1, 2, 3, 4]
    assert got == pytest.approx(train_losses(reference), **TOLERANCE)
    assert val_losses(run_dir) == pytest.approx(val_losses(reference), **TOLERANCE)
    assert {p.name for p in (run_dir / "checkpoints" / "step_00000002" / "offloaded_tensors").iterdir()} == \
        {"rank00", "rank01"}
    # The swap files DeepSpeed wrote (and leaves behind), one folder per rank, under a folder per run name.
    name = load_config(run_dir / "config.yaml").run.name
    for kind, files in (("optimizer", "*.tensor.swp"), ("float32params", "*_param.tensor.swp")):
        for rank in (0, 1):
            swapped = list((nvme / name / "zero_stage_3" / kind / f"rank{rank}").glob(files))
            assert swapped and all(f.stat().st_size >= 1024**2 for f in swapped), (kind, rank, swapped)


def test_nvme_offload_refuses_a_folder_it_cannot_write(tiny_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = zerotrain("train", *tiny_args(tmp_path / "run", tiny_data, "zero.stage=3", "zero.offload_param=nvme",
                                           f"zero.nvme_path={blocker}"), check=False)
    assert result.returncode == 2
    assert f"zero.nvme_path: cannot write swap files in {blocker}/" in result.stderr
    assert not (tmp_path / "run").exists()  # checked before anything started
