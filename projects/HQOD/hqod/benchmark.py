"""What the benchmarks (``tools/benchmark_*.py``) record about a run besides its results: the
checkout's commit, the machine, and the SHA-256 of the models it read or wrote."""
import hashlib
import os
import platform
import subprocess
from typing import Optional

__all__ = ["cpu_name", "git_commit", "machine", "sha256", "relative_to"]


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit() -> Optional[str]:
    """The checkout's commit (with ``+changes`` when the tree differs from it); None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if dirty.strip() else "")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores"


def relative_to(root: str, path: str) -> str:
    """``path`` relative to ``root`` when inside it (the benchmarks' commands run there)."""
    path = os.path.abspath(path)
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else path
