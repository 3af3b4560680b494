"""Entry point of one training rank: `python -m trainer.main RUN_DIR/config.yaml [--resume auto]`.

The launcher validates the user's config, writes the resolved copy into the run directory and
starts the ranks on that copy.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from torch.distributed.elastic.multiprocessing.errors import record

from trainer.config import load_config
from trainer.distributed import die_with_parent
from trainer.train import train


# DeepSpeed still calls this deprecated torch API on every step; the warning says nothing to a user.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


@record  # a failing rank's traceback reaches the launcher, which shows it
def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    parser = argparse.ArgumentParser(prog="python -m trainer.main", description=__doc__)
    parser.add_argument("config", help="the resolved config.yaml in the run directory")
    parser.add_argument("--resume", choices=["auto", "none"], default="none")
    args = parser.parse_args(argv)
    return train(load_config(args.config), resume=args.resume == "auto")


if __name__ == "__main__":
    code = main()
    # Leave without running interpreter teardown: gloo/DeepSpeed threads can abort it (ZeRO-3 exit crash).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
