"""NVMe offload's pre-flight: DeepSpeed's async_io op (it needs libaio), built once per machine."""

from __future__ import annotations

import tempfile
from pathlib import Path

from trainer.config import Config, ConfigError
from trainer.engine.deepspeed_config import nvme_folder


def check_nvme_offload(cfg: Config) -> None:
    """Pre-flight for NVMe offload, before any rank starts: zero.nvme_path is a writable folder (created if
    missing) and DeepSpeed's async_io op can be built (it needs libaio) - built now if it is not yet, so that
    the ranks load it from the cache instead of compiling it on the clock. Raises ConfigError with one line."""
    z = cfg.zero
    keys = [f"zero.{k}" for k in ("offload_optimizer", "offload_param") if getattr(z, k) == "nvme"]
    if not keys:
        return
    folder = nvme_folder(cfg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(f"zero.nvme_path: cannot write swap files in {folder} ({e.strerror or e})") from None
    if not async_io_available():
        raise ConfigError(f"{keys[0]}: nvme offload needs DeepSpeed's async_io op, which needs libaio and it is "
                          "not installed here (Debian/Ubuntu: apt-get install libaio-dev; elsewhere set CFLAGS/"
                          "LDFLAGS to its headers and library); use cpu offload instead")
    try:
        build_async_io()
    except Exception as e:  # a compiler error: its output went to stderr above
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{keys[0]}: DeepSpeed's async_io op, which nvme offload needs, did not build ({first})") \
            from None


def async_io_available() -> bool:
    """Whether DeepSpeed's async_io op can be built or loaded here: libaio's headers and library are found."""
    import contextlib
    import io

    from deepspeed.ops.op_builder import AsyncIOBuilder

    with contextlib.redirect_stdout(io.StringIO()):  # its compiler probe prints
        return bool(AsyncIOBuilder().is_compatible(verbose=False))


def build_async_io() -> None:
    """Load the op, JIT-compiling it first if needed: once per machine (cached in ~/.cache/torch_extensions, or
    TORCH_EXTENSIONS_DIR): 7.5 CPU-minutes of gcc measured, with DeepSpeed's pin_memory op it loads first."""
    import contextlib
    import io
    import sys

    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder import AsyncIOBuilder
    from torch.utils.cpp_extension import _get_build_directory

    if not installed_ops.get("async_io") and \
            not (Path(_get_build_directory("async_io", verbose=False)) / "async_io.so").exists():
        print("zerotrain: compiling DeepSpeed's async_io op for nvme offload, once on this machine (minutes)",
              file=sys.stderr, flush=True)
    with contextlib.redirect_stdout(io.StringIO()):
        AsyncIOBuilder().load(verbose=False)
