"""Real clusters on one machine, for tests: a Slurm cluster and multi-host process groups.

`SlurmCluster` runs real Slurm daemons (one slurmctld, one slurmd per fake node) on loopback:

    with SlurmCluster(tmp_path, nodes=2) as cluster:
        jobid = cluster.sbatch("-N2", "--ntasks-per-node=1", "--wrap", "srun hostname")
        info = cluster.wait(jobid)                      # polls `scontrol show job`, ~0.2 s
        assert info["JobState"] == "COMPLETED"

Each daemon runs in its own UTS + mount namespace with its own hostname (`ctl`, `n1`, `n2`, ...)
and a private /etc/hosts mapping those names to 127.0.0.1, so job scripts see `hostname` = nI and
`scontrol show hostnames` resolves, as on a real cluster. Clients (sbatch, squeue, ...) run in the
root namespace with `cluster.env` (it sets SLURM_CONF). Ports are picked free, so two clusters, or a
leftover from a crashed run, do not clash. Requeue works (`JobRequeue=1`) and a requeued job may run
again ~`requeue_delay_s` + 1-2 s after it was requeued (Slurm holds it for the credential lifetime).

`NetnsHosts` gives each of `count` fake hosts its own network namespace and IP 10.99.0.I on a private
bridge, for torch.distributed groups that span "hosts":

    with NetnsHosts(2) as hosts:
        procs = [hosts.popen(i, [python, "worker.py"], env={**os.environ, "MASTER_ADDR": hosts.ip(1),
                 "GLOO_SOCKET_IFNAME": hosts.ifname(i)}) for i in (1, 2)]

Hosts are numbered from 1 (h1 = 10.99.0.1). gloo needs GLOO_SOCKET_IFNAME = `hosts.ifname(i)`, else it
picks 127.0.0.1 and the other host cannot connect. Network safety: the namespaces have no default route
and are not connected to the root namespace; a blackhole route for 10.99.0.0/24 in the root namespace
makes a root-namespace client pointed at 10.99.x fail instead of leaving the machine.

Both need root (CI runs as root): they fail the test, not skip it, when they cannot work, because
CI must run these tests. Teardown stops only what they started, by PID or by namespace.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

SLURM_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
# States a job does not leave by itself (a requeued job passes through REQUEUED/PENDING instead)
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                             "BOOT_FAIL", "DEADLINE"})
BLACKHOLE = "10.99.0.0/24"


def require_root() -> None:
    """Fail (not skip) the calling test when not root: CI is root and must run these tests."""
    if os.geteuid() != 0:
        pytest.fail("this test starts real Slurm daemons / network namespaces and must run as root")


def _sh(*cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    """Run a setup command; on failure raise with its stderr (CalledProcessError's text omits it)."""
    result = subprocess.run(cmd, text=True, capture_output=True, timeout=timeout,
                            env={**os.environ, "PATH": SBIN_PATH})
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()[-2000:]}")
    return result


def _ns_inode(pid: int | str, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def _kill_namespace(kind: str, inodes: set[int], grace: float = 5) -> None:
    """SIGTERM, then SIGKILL, every process inside namespaces that we created (so certainly ours):
    slurmstepd's and job processes that outlived their slurmd, workers left in a fake host."""
    def members() -> list[int]:
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and _ns_inode(p, kind) in inodes]
    if not inodes:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        pids = members()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = members()
        if not pids:
            return


def _stop_process(proc: subprocess.Popen, grace: float = 10) -> None:
    """Stop one process we started, by PID: SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that nothing listens on, below the ephemeral range (32768+) so that
    outgoing connections cannot be handed one of them before our daemon binds it."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 32000)
        if port in ports:
            continue
        try:
            with socket.socket() as s:  # daemons bind 0.0.0.0 or 127.0.0.1: this bind covers both
                s.bind(("0.0.0.0", port))
        except OSError:
            continue
        ports.append(port)
    return ports


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"({e})"


# ------------------------------------------------------------------------------------------------
# Slurm


def _ensure_slurm_installed() -> None:
    """Install Slurm + munge with apt when missing (Debian 12). Never removes packages."""
    if all(shutil.which(b, path=SBIN_PATH) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PATH": SBIN_PATH}
    lock = ["-o", "DPkg::Lock::Timeout=300"]  # another apt run on the machine: wait, do not fail
    for cmd in (["apt-get", "update", "-qq", *lock],
                ["apt-get", "install", "-y", "-qq", *lock, "--no-install-recommends", *SLURM_PACKAGES]):
        result = subprocess.run(cmd, text=True, capture_output=True, env=env, timeout=900)
        if result.returncode != 0:
            pytest.fail(f"cannot install Slurm: {' '.join(cmd)} exited {result.returncode}:\n"
                        f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")


def _munge_ok() -> bool:
    return subprocess.run("munge -n | unmunge", shell=True, capture_output=True,
                          env={**os.environ, "PATH": SBIN_PATH}).returncode == 0


class _Munge:
    """munged is machine-wide (its socket is /run/munge): start it if it is not answering, and stop it
    when the last cluster of this process that needed it stops, only if we started it."""
    lock = threading.Lock()
    users = 0
    pid: int | None = None  # set when this process started munged

    @classmethod
    def acquire(cls) -> None:
        with cls.lock:
            if not _munge_ok():
                cls._start()
            cls.users += 1  # only once it answers: a failed acquire needs no release

    @classmethod
    def _start(cls) -> None:
        """Start munged as user munge (as its package would), after making sure a key exists."""
        key = Path("/etc/munge/munge.key")
        if not key.exists() or key.stat().st_size == 0:  # the package makes one; recreate if lost
            key.write_bytes(os.urandom(1024))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        _sh("install", "-d", "-o", "munge", "-g", "munge", "-m", "755", "/run/munge")
        _sh("runuser", "-u", "munge", "--", "munged")  # daemonizes and writes its pidfile
        deadline = time.monotonic() + 10
        while not _munge_ok():
            if time.monotonic() > deadline:
                raise RuntimeError("munged started but `munge -n | unmunge` still fails")
            time.sleep(0.1)
        cls.pid = int(Path("/run/munge/munged.pid").read_text())

    @classmethod
    def release(cls) -> None:
        with cls.lock:
            cls.users -= 1
            if cls.users > 0 or cls.pid is None:
                return
            pid, cls.pid = cls.pid, None
            try:  # the pid is still munged (not a reused pid) and still ours
                if Path(f"/proc/{pid}/comm").read_text().strip() != "munged":
                    return
                os.kill(pid, signal.SIGTERM)
            except (OSError, ProcessLookupError):
                return
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    return
                time.sleep(0.1)


class CommandError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-3000:]}"


class SlurmCluster:
    """A real Slurm cluster on loopback: slurmctld + `nodes` slurmd's named n1..nN, partition `debug`."""

    partition = "debug"

    def __init__(self, workdir: Path, nodes: int = 2, cpus_per_node: int = 2, mem_per_node_mb: int = 2000,
                 requeue_delay_s: int = 10):
        # Slurm holds a requeued job for the job credential lifetime (AuthInfo cred_expire; Slurm's default
        # 120 s, minimum 5) so that a slurmd that still remembers the old run's revoked credential does not
        # reject the new run. It is also how long a step's launch credential stays valid: keep a margin.
        if requeue_delay_s < 5:
            raise ValueError("Slurm's minimum cred_expire is 5 s")
        self.requeue_delay_s = requeue_delay_s
        self.workdir = Path(workdir).resolve()
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.cpus_per_node = cpus_per_node
        self.mem_per_node_mb = mem_per_node_mb
        self.conf = self.workdir / "slurm.conf"
        self.logs = self.workdir / "log"
        self._daemons: dict[str, subprocess.Popen] = {}  # name -> the process we started
        self._uts: set[int] = set()  # the daemons' UTS namespaces: their slurmstepd's and jobs live there
        self._munge = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:  # includes pytest.fail: never leave half a cluster running
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        require_root()
        _ensure_slurm_installed()
        _Munge.acquire()
        self._munge = True
        self._write_config()
        started = time.monotonic()
        # -c: start from empty state, even if the workdir holds an older cluster's jobs
        self._spawn("slurmctld", "ctl", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait_idle(started + timeout)

    def stop(self) -> None:
        """Cancel every job, stop only the daemons we started (by PID) and whatever still runs in their
        namespaces, and munged if we started it. Safe to call twice and after a failed start."""
        ctld = self._daemons.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:  # cancelled jobs end through slurmd, which then stops their slurmstepd's cleanly
                ids = self.run("squeue", "-h", "-o", "%i", timeout=10).stdout.split()
                if ids:
                    self.run("scancel", *ids, timeout=10)
                deadline = time.monotonic() + 15
                while self.run("squeue", "-h", timeout=10).stdout.strip() and time.monotonic() < deadline:
                    time.sleep(0.2)
            except (subprocess.SubprocessError, OSError):
                pass  # a broken controller: killing the namespaces below still ends every job
        for name in sorted(self._daemons, key=lambda n: n == "slurmctld"):  # slurmd's first
            _stop_process(self._daemons[name])
        self._daemons.clear()
        _kill_namespace("uts", self._uts)
        self._uts.clear()
        if self._munge:
            self._munge = False
            _Munge.release()

    # -- clients -----------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients (they run in the root namespace and find the cluster by SLURM_CONF)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": SBIN_PATH}

    def run(self, *cmd: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; raise with its output if it fails."""
        cmd = tuple(map(str, cmd))
        result = subprocess.run(cmd, env=self.env, text=True, capture_output=True, timeout=timeout, **kw)
        if result.returncode != 0:
            raise CommandError(result.returncode, cmd, result.stdout, result.stderr)
        return result

    def sbatch(self, *args: str, **kw) -> int:
        """Submit with `sbatch --parsable ARGS` and return the job id."""
        return int(self.run("sbatch", "--parsable", *args, **kw).stdout.strip().split(";")[0])

    def job(self, jobid: int | str) -> dict[str, str]:
        """`scontrol show job -o JOBID` as a dict (JobState, Restarts, ExitCode, NodeList, BatchHost, ...)."""
        line = self.run("scontrol", "show", "job", "-o", str(jobid)).stdout.splitlines()[0]
        info: dict[str, str] = {}
        key = None
        for token in line.split():
            name, eq, value = token.partition("=")
            if eq and name.replace(":", "").replace("/", "").isalnum():
                key, info[name] = name, value
            elif key is not None:  # a value with spaces (Command=, WorkDir=, Reason=...)
                info[key] += " " + token
        return info

    def wait(self, jobid: int | str, states: Iterable[str] = TERMINAL_STATES, timeout: float = 120,
             interval: float = 0.2) -> dict[str, str]:
        """Poll scontrol until the job's JobState is in `states`; return its info. Not `sbatch --wait`:
        that backs off to 10 s between polls."""
        states = set(states)
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(jobid)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {jobid} not in {sorted(states)} after {timeout} s: {info}")
            time.sleep(interval)

    # -- internals ---------------------------------------------------------------------------------

    def _write_config(self) -> None:
        for d in ("state", "run", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)  # slurmd needs its spool dir first
        names = " ".join(["ctl", *self.nodes])
        (self.workdir / "hosts").write_text(f"127.0.0.1 localhost {names}\n::1 localhost\n")
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        w = self.workdir  # paths are quoted: a workdir may contain spaces
        lines = [
            "ClusterName=zerotrain",
            "SlurmctldHost=ctl(127.0.0.1)",  # slurmctld runs with hostname `ctl` (its own UTS namespace)
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=cred_expire={self.requeue_delay_s}",  # see __init__
            "SlurmUser=root",
            "SlurmdUser=root",
            f'StateSaveLocation="{w}/state"',
            f'SlurmdSpoolDir="{w}/spool/%n"',
            f'SlurmctldPidFile="{w}/run/slurmctld.pid"',
            f'SlurmdPidFile="{w}/run/slurmd-%n.pid"',
            f'SlurmctldLogFile="{w}/log/slurmctld.log"',
            f'SlurmdLogFile="{w}/log/slurmd-%n.log"',
            "ProctrackType=proctrack/linuxproc",  # no systemd/cgroup setup needed
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",  # trust the CPUs= below, not the machine's cores
            "SchedulerType=sched/backfill",
            # batch_sched_delay=0: else ~3 s before each job starts. sched_interval/bf_interval=1: a requeued
            # job becomes eligible later with no event to wake the schedulers (default every 60 s / 30 s).
            "SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",  # every job's end state, readable after MinJobAge
            f'JobCompLoc="{w}/log/jobcomp.log"',
            "MpiDefault=none",
            "MailProg=/bin/true",  # else "Configured MailProg is invalid"
            "ReturnToService=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "MinJobAge=300",  # `scontrol show job` keeps finished jobs this long
            "KillWait=5",  # SIGTERM -> SIGKILL at cancel / time limit
            "JobRequeue=1",  # batch jobs are requeueable by default (scontrol requeue, node failure)
            # slurmd's and srun's listen on their host name's address (127.0.0.1 here), not on every
            # interface (slurmctld 22.05 still binds 0.0.0.0; it is only ever contacted on 127.0.0.1)
            "CommunicationParameters=NoInAddrAny",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={node} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus_per_node} "
                         f"RealMemory={self.mem_per_node_mb} State=UNKNOWN")
        lines.append(f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, hostname: str, cmd: list[str]) -> None:
        """Start a daemon in the foreground (-D) in its own UTS + mount namespace, with hostname
        `hostname` and our hosts file as /etc/hosts, so it is "host" `hostname` as on a real cluster."""
        script = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'
        wrapped = ["unshare", "--uts", "--mount", "--propagation", "private",
                   "bash", "-c", script, "_", hostname, str(self.workdir / "hosts"), *cmd]
        with open(self.logs / f"{name}.stderr", "ab") as out:
            proc = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env, start_new_session=True)  # Ctrl-C: our stop(), not a race
        self._daemons[name] = proc
        own = _ns_inode("self", "uts")
        deadline = time.monotonic() + 10
        while (ns := _ns_inode(proc.pid, "uts")) in (own, None):  # unshare has not run yet
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{_tail(self.logs / f'{name}.stderr')}")
            time.sleep(0.01)
        self._uts.add(ns)

    def wait_idle(self, timeout: float = 120) -> None:
        """Until every node is idle (a finished job's nodes are COMPLETING for a moment)."""
        self._wait_idle(time.monotonic() + timeout)

    def _wait_idle(self, deadline: float) -> None:
        while True:
            dead = [n for n, p in self._daemons.items() if p.poll() is not None]
            sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, text=True,
                                   capture_output=True, timeout=30)
            idle = {line.split()[0] for line in sinfo.stdout.splitlines() if line.endswith(" idle")}
            if not dead and idle >= set(self.nodes):
                return
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted(self.logs.iterdir()))
                raise RuntimeError(f"Slurm cluster not ready (exited: {dead}); sinfo: {sinfo.stdout.strip()} "
                                   f"{sinfo.stderr.strip()}\n{logs}")
            time.sleep(0.2)


# ------------------------------------------------------------------------------------------------
# network namespaces


class NetnsHosts:
    """`count` fake hosts h1..hN, each a network namespace with IP 10.99.0.I/24 on a veth whose other end
    is on a bridge in a namespace of its own. No default routes: only these addresses and each host's
    loopback are reachable. Hosts are numbered from 1."""

    def __init__(self, count: int = 2, prefix: str | None = None):
        if not 1 <= count <= 250:
            raise ValueError(f"count must be 1..250, not {count}")
        # interface names are at most 15 characters: prefix + "e" + up to 3 digits
        self.prefix = prefix or f"zt{secrets.token_hex(3)}"
        if len(self.prefix) > 10 or not self.prefix.replace("-", "").isalnum():
            raise ValueError(f"prefix must be <= 10 letters/digits/-: {self.prefix!r}")
        self.count = count
        self.switch = f"{self.prefix}-sw"
        self.namespaces = [f"{self.prefix}-h{i}" for i in range(1, count + 1)]
        self._added_route = False
        self._tmp: Path | None = None
        self._procs: list[subprocess.Popen] = []

    def ip(self, i: int) -> str:
        return f"10.99.0.{self._check(i)}"

    def ifname(self, i: int) -> str:
        """The veth inside host i's namespace: what GLOO_SOCKET_IFNAME must name."""
        return f"{self.prefix}e{self._check(i)}"

    def netns(self, i: int) -> str:
        return self.namespaces[self._check(i) - 1]

    def popen(self, i: int, cmd: Sequence[str] | str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        """Start `cmd` (argv, or a bash command line) inside host i: its network namespace, hostname h{i},
        and an /etc/hosts that maps h1..hN to their IPs."""
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(map(str, cmd))
        script = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'
        wrapped = ["nsenter", f"--net=/run/netns/{self.netns(i)}", "unshare", "--uts", "--mount",
                   "--propagation", "private", "bash", "-c", script, "_", f"h{i}", str(self._tmp / "hosts"), *argv]
        kw.setdefault("start_new_session", True)  # its own group: a Ctrl-C reaches our teardown, not it
        proc = subprocess.Popen(wrapped, env=os.environ.copy() if env is None else env, **kw)
        self._procs.append(proc)
        return proc

    def run(self, i: int, cmd: Sequence[str] | str, env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Like subprocess.run (text, captured output) inside host i; the process is killed on timeout."""
        proc = self.popen(i, cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, proc.args, out, err)
        return result

    def __enter__(self) -> NetnsHosts:
        try:
            self._setup()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._teardown()

    def _check(self, i: int) -> int:
        if not 1 <= i <= self.count:
            raise IndexError(f"hosts are numbered 1..{self.count}, not {i}")
        return i

    def _setup(self) -> None:
        require_root()
        # First: a root-namespace client pointed at 10.99.x must fail here, never follow the default route
        if not _sh("ip", "route", "show", "type", "blackhole", BLACKHOLE).stdout.strip():
            _sh("ip", "route", "add", "blackhole", BLACKHOLE)
            self._added_route = True
        self._delete_namespaces()  # leftovers of a crashed run with the same prefix
        self._tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        (self._tmp / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n" +
                                         "".join(f"{self.ip(i)} h{i}\n" for i in range(1, self.count + 1)))
        sw, br = self.switch, f"{self.prefix}br"
        _sh("ip", "netns", "add", sw)
        _sh("ip", "-n", sw, "link", "add", br, "type", "bridge")
        _sh("ip", "-n", sw, "link", "set", br, "up")
        for i in range(1, self.count + 1):
            ns, peer = self.netns(i), f"{self.prefix}p{i}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            # both ends are created directly inside the namespaces: nothing appears in the root namespace
            _sh("ip", "link", "add", self.ifname(i), "netns", ns, "type", "veth", "peer", "name", peer, "netns", sw)
            _sh("ip", "-n", sw, "link", "set", peer, "master", br)
            _sh("ip", "-n", sw, "link", "set", peer, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", self.ifname(i))
            _sh("ip", "-n", ns, "link", "set", self.ifname(i), "up")

    def _delete_namespaces(self) -> None:
        existing = set(_sh("ip", "netns", "list").stdout.split())
        ours = [n for n in (*self.namespaces, self.switch) if n in existing]
        inodes = {os.stat(f"/run/netns/{n}").st_ino for n in ours if Path(f"/run/netns/{n}").exists()}
        _kill_namespace("net", inodes)  # else a namespace outlives `ip netns del` while a process is in it
        for n in ours:
            _sh("ip", "netns", "del", n, check=False)  # deleting a namespace deletes its veths and bridge

    def _teardown(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                try:  # its whole process group (torchrun's workers, shells' children)
                    os.killpg(proc.pid, signal.SIGKILL) if proc.pid == os.getpgid(proc.pid) else proc.kill()
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait(10)
        self._procs.clear()
        self._delete_namespaces()
        if self._added_route:
            _sh("ip", "route", "del", "blackhole", BLACKHOLE, check=False)
            self._added_route = False
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
