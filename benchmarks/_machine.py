"""What a benchmark ran on: date, CPU, cores, versions, hmir commit, GPU. Shared by the scripts.

Example::

    >>> from _machine import machine        # run from benchmarks/ (the scripts' own folder)
    >>> sorted(machine())[:3]
    ['cores', 'cpu', 'cuda']
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                        platform.processor() or "?")
    except OSError:
        return platform.processor() or "?"


def _commit() -> str:
    try:
        git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,  # noqa: E731
                                        cwd=ROOT).stdout.strip()
        rev = git("rev-parse", "--short", "HEAD")
        return rev + (" (+ uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")
    except OSError:
        return "?"


def machine(**extra) -> dict:
    """The environment record every benchmark writes; ``extra`` adds keys (e.g. torchvision)."""
    return {"date": _dt.datetime.now().isoformat(timespec="seconds"), "cpu": _cpu(),
            "cores": os.cpu_count(), "torch": torch.__version__, **extra,
            "python": platform.python_version(), "hmir_commit": _commit(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
