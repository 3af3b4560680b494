"""The job script `zerotrain submit` renders, run by bash with stand-ins for Slurm's commands (srun, sbatch,
scontrol, sinfo record how they were called): whatever characters a path holds, it reaches each command as one
argument, and none of it runs as shell code."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from helpers import TINY
from launcher import slurm
from trainer.config import load_config

# ; | & $( ) ` newline * quotes and % in one folder name
HOSTILE = "a;touch PWN1|touch PWN2&touch PWN3$(touch PWN4)`touch PWN5`\ntouch PWN6 *'q\"%x"
STAND_IN = """#!/bin/sh
python3 -c 'import json, sys; open(sys.argv[1], "a").write(json.dumps(sys.argv[2:]) + "\\n")' "$CALLS" "$(basename "$0")" "$@"
[ "$(basename "$0")" = sbatch ] && echo "12;cluster"
[ "$(basename "$0")" = srun ] && exit "$SRUN_EXIT"
exit 0
"""


def run_script(tmp_path: Path, srun_exit: int, nodes: tuple[int, int]) -> tuple[list[list[str]], Path, Path]:
    """The rendered script of a run in a hostile folder, run once; (every command's argv, log folder, config)."""
    folder = tmp_path / HOSTILE
    cfg = load_config(TINY)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": folder / "run"})})
    config_file = folder / "run" / "config.yaml"
    script = slurm.render(cfg, config_file, slurm.Request(*nodes, ranks_per_node=2), workdir=folder)
    log_dir = slurm.log_folder(cfg)
    log_dir.mkdir(parents=True)
    (log_dir / "job.sbatch").write_text(script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for command in ("srun", "sbatch", "scontrol", "sinfo"):
        (bin_dir / command).write_text(STAND_IN)
        (bin_dir / command).chmod(stat.S_IRWXU)
    calls = tmp_path / "calls.jsonl"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(calls), "SRUN_EXIT": str(srun_exit),
           "SLURM_JOB_ID": "11", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_PARTITION": "debug"}
    subprocess.run(["bash", str(log_dir / "job.sbatch")], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    return [json.loads(line) for line in calls.read_text().splitlines()], log_dir, config_file


@pytest.mark.parametrize("srun_exit,nodes,then", [(3, (1, 2), "sbatch"), (3, (2, 2), "scontrol"), (1, (1, 1), None)],
                         ids=["saved, next segment by sbatch", "saved, requeued", "failed"])
def test_no_path_of_the_job_script_runs_as_shell_code(tmp_path, srun_exit, nodes, then):
    calls, log_dir, config_file = run_script(tmp_path, srun_exit, nodes)
    assert not [p for p in tmp_path.rglob("PWN*")] and not [p for p in Path.cwd().glob("PWN*")]
    srun = next(call for call in calls if call[0] == "srun")
    assert srun[-6:] == ["-m", "launcher.cli", "train", str(config_file), "--resume", "auto"], srun  # one argument
    assert (log_dir / "segments").read_text().strip() == "1"  # the script's own files land in the hostile folder
    if then == "sbatch":
        sbatch = next(call for call in calls if call[0] == "sbatch")
        assert f"--output={str(log_dir).replace('%', '%%')}/slurm-%j.out" in sbatch
        assert sbatch[-1] == str(log_dir / "job.sbatch")
        assert (log_dir / "jobs").read_text().split() == ["12"]
    elif then == "scontrol":
        assert ["scontrol", "requeue", "11"] in calls
    else:
        assert (log_dir / "failures").read_text().strip() == "1" and len(calls) == 1


def test_submit_gives_sbatch_the_log_file(tmp_path):
    """The log path goes to sbatch as an argument: no directive of the script names it."""
    cfg = load_config(TINY, [f"run.output_dir={tmp_path / 'run'}"])
    script = slurm.render(cfg, tmp_path / "run" / "config.yaml", slurm.Request(1, 1, ranks_per_node=2), tmp_path)
    assert str(tmp_path) not in "".join(line for line in script.splitlines() if line.startswith("#SBATCH"))
    assert os.fspath(slurm.output(cfg)).endswith("/run/slurm/slurm-%j.out")
