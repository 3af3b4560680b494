"""Entry point of one training rank.

`python -m trainer.main RUN_DIR/config.yaml [--resume-from TAG]` is what the launcher's agent starts on each
rank, TAG the checkpoint its pre-flight chose; under srun, mpirun or torchrun the `zerotrain train` process
calls `run` itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record

from trainer.checkpointing import resume
from trainer.config import Config, load_config
from trainer.parallel.distributed import die_with_parent
from trainer.train import train

# DeepSpeed still calls this deprecated torch API on every step; the warning says nothing to a user.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


class WholeErrorFile(ErrorHandler):
    """The rank's error report for the launcher, written whole or not at all: torch's own handler leaves an
    empty or torn file on a full disk, which the launcher's agent cannot parse and dies on."""

    def record_exception(self, e: BaseException) -> None:
        path = self._get_error_file_path()
        if not path:
            return
        report = {"message": {"message": f"{type(e).__name__}: {e}", "extraInfo": {
            "py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}}}
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(report, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            for leftover in (tmp, path):
                try:
                    os.remove(leftover)
                except OSError:
                    pass
            print(f"zerotrain: could not write the error report {path} ({err})", file=sys.stderr)


def _run(cfg: Config, resume_from: str | None) -> int:
    die_with_parent()
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
        # The agent restarting the ranks after a failure (launch.max_restarts): the pre-flight's decision is
        # behind the saves since; the same decision again, from the last save.
        point = resume.decide(cfg.run_dir, cfg.layout)
        resume_from = point.tag if point else None
    return train(cfg, resume_from)


run = record(_run, error_handler=WholeErrorFile())  # a failing rank's traceback reaches the launcher


def exit_now(code: int) -> None:
    """Leave without interpreter teardown: gloo/DeepSpeed threads can abort it (ZeRO-3 exit crash)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m trainer.main", description=__doc__)
    parser.add_argument("config", help="the resolved config.yaml in the run directory")
    parser.add_argument("--resume-from", metavar="TAG", help="the checkpoint to continue from (the pre-flight's)")
    args = parser.parse_args()
    try:
        code = run(load_config(args.config), args.resume_from)
    except Exception:  # @record has written the error file for the launcher
        traceback.print_exc()
        code = 1
    exit_now(code)
