"""One job at a time per run directory.

The job's first process - node 0's launcher, or global rank 0 where srun, mpirun or torchrun started the ranks -
holds a POSIX record lock (`fcntl.lockf`) on RUN_DIR/.lock for the whole job, and writes who it is into the
file. The kernel drops the lock when the holder dies however it dies (on NFS the server does, when the
client's lease ends), so a killed job never blocks the next one; the holder's record is then left behind
and recognised as stale. A second job is refused in one line naming the holder. The other processes of the
holder's job take no lock: they write nothing into the run directory before rank 0 has joined them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from data_pipeline.errors import UserError

LOCK = ".lock"


class RunInUse(UserError):
    pass


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    slurm_job: str | None
    since: float

    @classmethod
    def me(cls) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID"), time.time())

    def __str__(self) -> str:
        job = f", Slurm job {self.slurm_job}" if self.slurm_job else ""
        return f"host {self.host}, pid {self.pid}{job}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))}"


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.fd: int | None = None

    def acquire(self) -> Holder | None:
        """Take the run directory, or raise RunInUse naming its holder. Returns the record a killed holder
        left behind (a stale lock), if any. The run directory is created if needed."""
        run_dir = self.path.parent
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"run.output_dir: {run_dir} is a file, not a folder")
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(fd)
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise RunInUse(f"run.output_dir: {run_dir} is in use by another job ({holder or 'holder unknown'}); "
                           "wait for it to end, or choose another run.output_dir") from None
        stale = _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(Holder.me())).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return stale

    def release(self) -> None:
        """Clear the record (a clean end leaves nothing stale behind) and drop the lock. Never unlink the
        file: a process waiting on it would then lock a file nobody else sees."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing any descriptor of the file drops this process's lock
            self.fd = None


def _read(fd: int) -> Holder | None:
    try:
        return Holder(**json.loads(os.pread(fd, 4096, 0)))
    except (ValueError, TypeError):  # empty (released cleanly) or unreadable
        return None
