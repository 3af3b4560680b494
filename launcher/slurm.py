"""`zerotrain submit`: render slurm/zerotrain.sbatch for a run and hand it to sbatch.

Values reach the script in two ways, both safe from injection: #SBATCH directives only take values that match a
strict pattern (sbatch parses those lines itself), and every value in the shell body is one word quoted by
`shell`, whatever its characters. Paths, which may hold any character, never go into a directive: the log file
is given to sbatch as an argument (`--output`), not as a line of the script.
"""

from __future__ import annotations

import re
import shlex
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from launcher.run_lock import RunLock
from data_pipeline.errors import UserError
from trainer.config import Config, ConfigError

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "zerotrain.sbatch"
NAME = re.compile(r"[A-Za-z0-9_.-]+")
TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|\d+-\d+")  # minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]


@dataclass(frozen=True)
class Request:
    """What the job asks of Slurm: GPU nodes get one rank per GPU, CPU nodes ranks_per_node ranks."""

    min_nodes: int  # each segment of the job runs on as many of min_nodes-max_nodes as can run it
    max_nodes: int
    ranks_per_node: int
    gpus_per_node: int = 0
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    warning_seconds: int = 120  # USR1 this long before the time limit: enough to finish a step and save

    @property
    def nodes(self) -> str:
        return str(self.max_nodes) if self.min_nodes == self.max_nodes else f"{self.min_nodes}-{self.max_nodes}"

    def first_segment_nodes(self) -> str:
        """--nodes of the first segment: Slurm allocates a range's minimum, so the minimum is raised to the nodes
        of the partition that can run the job now (the requeues in the script do the same)."""
        if self.min_nodes == self.max_nodes:
            return self.nodes
        return f"{min(self.max_nodes, max(self.min_nodes, schedulable_nodes(self.partition)))}-{self.max_nodes}"


def render(cfg: Config, config_file: Path, request: Request, workdir: Path) -> str:
    """The job script for the resolved config in config_file; it is saved as RUN_DIR/slurm/job.sbatch (a node
    range's next segments are submitted from there, with `output`)."""
    _check_directive("run.name", cfg.run.name, NAME)
    log_dir = log_folder(cfg)
    lines = [f"#SBATCH --gpus-per-node={request.gpus_per_node}"] if request.gpus_per_node else []
    for flag, value, pattern in (("partition", request.partition, NAME), ("account", request.account, NAME),
                                 ("time", request.time, TIME)):
        if value is not None:
            _check_directive(f"--{flag}", value, pattern)
            lines.append(f"#SBATCH --{flag}={value}")
    kind = f"{request.gpus_per_node} GPU ranks" if request.gpus_per_node else f"{request.ranks_per_node} CPU ranks"
    return string.Template(TEMPLATE.read_text()).substitute(
        description=f"run {cfg.run.name}, {request.nodes} node(s) x {kind}", job_name=cfg.run.name,
        nodes=request.first_segment_nodes(), ranks_per_node=int(request.ranks_per_node),
        resource_lines="\n".join(lines), warning_seconds=int(request.warning_seconds),
        **{name: shell(value) for name, value in (
            ("min_nodes", request.min_nodes), ("max_nodes", request.max_nodes), ("log_dir", log_dir),
            ("max_restarts", cfg.launch.max_restarts), ("workdir", workdir), ("python", sys.executable),
            ("config", config_file.absolute()), ("script", log_dir / "job.sbatch"), ("output", output(cfg)))})


def shell(value) -> str:
    """`value` as one word of the job script's shell code, whatever its characters."""
    return shlex.quote(str(value))


def log_folder(cfg: Config) -> Path:
    return cfg.run_dir.absolute() / "slurm"


def output(cfg: Config) -> str:
    """The job's log file as sbatch's --output takes it: a filename pattern (%j: the job id; a % of the path
    doubled)."""
    return str(log_folder(cfg)).replace("%", "%%") + "/slurm-%j.out"


def _check_directive(name: str, value: str, pattern: re.Pattern) -> None:
    if not pattern.fullmatch(value):
        raise ConfigError(f"{name}: {value!r} is not a valid Slurm value (allowed: {pattern.pattern})")


UNSCHEDULABLE = re.compile(r"drain|drng|down|fail|maint|\*")  # node states (and flags) no job starts on


def schedulable_nodes(partition: str | None) -> int:
    """The partition's nodes that are up, responding and not drained (0 without a Slurm client). The same
    filter as the job script's requeue."""
    if shutil.which("sinfo") is None:
        return 0
    args = ["sinfo", "-h", "-N", "-o", "%N %T"] + (["-p", partition] if partition else [])
    listed = subprocess.run(args, capture_output=True, text=True).stdout.split("\n")
    return len({line.split()[0] for line in listed if line.strip() and not UNSCHEDULABLE.search(line.split()[-1])})


def check_partition(partition: str) -> None:
    """Refuse a partition the cluster does not have, naming the ones it has."""
    known = [p.rstrip("*") for p in _client("sinfo", "--noheader", "--format=%P").split()]
    if partition not in known:
        raise ConfigError(f"--partition: {partition!r} is not a partition of this cluster ({', '.join(known)})")


ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING")


def check_not_queued(run_dir: Path) -> None:
    """Refuse a second job for a run directory whose last job is queued or running (it would overwrite that
    job's config and script), or that another job holds (launcher.run_lock)."""
    jobs = run_dir / "slurm" / "jobs"
    if jobs.is_file() and jobs.read_text().split():
        job = jobs.read_text().split()[-1]
        state = job_state(job)
        if state in ACTIVE:
            raise UserError(f"run.output_dir: {run_dir} belongs to Slurm job {job} ({state}); wait for it to end "
                            f"or scancel {job}, then submit again with --resume auto")
    if run_dir.is_dir():
        lock = RunLock(run_dir)
        lock.acquire()  # raises RunInUse naming the holder
        lock.release()


def submit(script: Path, log: str) -> str:
    """sbatch the script, its output to `log` (output()); returns the job id. A refusal (resources, account...)
    is one line naming the cause."""
    # Without EnforcePartLimits Slurm queues a job that can never start; --test-only asks the scheduler first.
    _client("sbatch", "--test-only", f"--output={log}", str(script))
    return _client("sbatch", "--parsable", f"--output={log}", str(script)).strip().split(";")[0]


def job_state(job_id: str) -> str | None:
    """JobState of a job Slurm still knows (None without a Slurm client or once it forgot the job)."""
    if shutil.which("scontrol") is None:
        return None
    shown = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True)
    match = re.search(r"\bJobState=(\S+)", shown.stdout)
    return match[1] if match else None


def _client(command: str, *args: str) -> str:
    if shutil.which(command) is None:
        raise UserError(f"{command}: not found on PATH; submitting needs a Slurm client (--dry-run prints the "
                        "job script without one)")
    done = subprocess.run([command, *args], capture_output=True, text=True)
    if done.returncode:
        message = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no message"]
        raise UserError(f"{command} refused: {message[0]}")
    return done.stdout
