"""An MLflow tracking server as a team runs one - sqlite backend, artifacts served by the server - on a free
loopback port, from .venv-mlflow-server (`make test` installs it: the server pins a pyarrow below the one datasets
needs). For the tracker tests and bench/trackers.py."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from ranks import free_port

REPO = Path(__file__).resolve().parents[1]
MLFLOW = REPO / ".venv-mlflow-server" / "bin" / "mlflow"


@contextmanager
def mlflow_server(folder: Path):
    """A tracking server on a free loopback port, its runs in folder/mlflow.db; yields its URI and process."""
    assert MLFLOW.exists(), f"{MLFLOW} is missing: `make test` installs the MLflow server"
    folder.mkdir(parents=True)
    uri = f"http://127.0.0.1:{free_port()}"
    with open(folder / "server.log", "w") as out:
        server = subprocess.Popen([MLFLOW, "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                                   "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                                   "--port", uri.rsplit(":", 1)[1], "--workers", "1"],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(uri, server)
        yield uri, server
    finally:
        stop(server)


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stop(server: subprocess.Popen) -> None:
    """The server and its workers (its own process group, started by this test)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _wait_healthy(uri: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not _healthy(uri):
        assert server.poll() is None, f"the MLflow server exited with {server.returncode}"
        assert time.monotonic() < deadline, "the MLflow server did not answer in time"
        time.sleep(0.5)
