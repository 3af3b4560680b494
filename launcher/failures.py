"""What the launcher says when ranks fail: a line per failed rank with the cause as far as it is known - its
error report, its exit code or signal (SIGKILL: most likely the kernel's OOM killer, with the rank's last
logged memory), a peer's death it only followed - and a full disk where the run directory's is."""

from __future__ import annotations

import re
import signal
from pathlib import Path

from data_pipeline.files import full_disk
from trainer.checkpointing import store

# A rank whose peer died fails in its next collective with one of these: a consequence, not a cause.
PEER_GONE = re.compile(r"connection closed by peer|connection reset by peer|broken pipe|socket timeout", re.I)
MEMORY = re.compile(r"\b(mem/\w+_gib) ([\d.]+)")


def describe_failures(failures: dict, run_dir: Path) -> list[str]:
    """`failures`: torch elastic's {rank: ProcessFailure}."""
    killed = sorted(rank for rank, f in failures.items() if f.exitcode < 0)
    lines = []
    for rank, failure in sorted(failures.items()):
        log = run_dir / "logs" / f"rank{rank}.log"
        cause = _first_line(failure)
        if failure.exitcode == -signal.SIGKILL:
            cause += f"; most likely out of memory (the kernel's OOM killer sends SIGKILL){_last_memory(log)}"
        elif killed and rank not in killed and PEER_GONE.search(cause):
            cause += f" - a consequence: rank {killed[0]} died first"
        lines += [f"zerotrain: rank {rank} failed ({_exit_reason(failure.exitcode)}): {cause}",
                  f"zerotrain: its log: {log}"]
    return lines + disk_full(run_dir)


def unreadable_report(error: Exception, run_dir: Path) -> list[str]:
    """A rank failed and torch could not read its error report (torn or empty: a full disk, or a kill while it
    was written)."""
    return [f"zerotrain: a rank failed and its error report is unreadable ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); its traceback is above, its log in "
            f"{run_dir / 'logs'}"] + disk_full(run_dir)


def disk_full(run_dir: Path) -> list[str]:
    if not full_disk(run_dir):
        return []
    latest = store.pointer(run_dir, store.LATEST)
    return [f"zerotrain: the disk holding {run_dir} is full (ENOSPC): free space; the last complete checkpoint "
            f"({latest or 'none'}) is intact and --resume auto continues from it"]


def _exit_reason(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _first_line(failure) -> str:
    """The error file holds {"message": "Type: text", "extraInfo": {traceback...}}; the rank has already
    printed the traceback, so one line names the cause here. Without an error file torch puts a link in
    `message`: the rank wrote no report (killed, or it could not write one)."""
    if failure.error_file == "<N/A>":
        return "no error report (see its log)"
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", message)
    return str(message).strip().splitlines()[0] if str(message).strip() else "no error recorded"


def _last_memory(log: Path) -> str:
    """The rank's last logged memory, from its log (every rank notes it at each log step and save)."""
    try:
        found = MEMORY.findall(log.read_text(errors="replace"))
    except OSError:
        return ""
    if not found:
        return ""
    last = dict(found[-4:])
    return "; its last logged memory: " + ", ".join(f"{key.removeprefix('mem/')} {float(value):.2f} GiB"
                                                    for key, value in last.items())
