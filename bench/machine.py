"""The machine and the software a run measured, and how busy the machine was besides.

Other processes on the same cores change every figure, so the run records
how much CPU the rest of the machine used while it ran (all CPU time in
/proc/stat minus this process and its children).
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _git_output(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


def _git() -> str:
    try:
        commit = _git_output("rev-parse", "--short", "HEAD")
        dirty = _git_output("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + (" (with uncommitted changes)" if dirty else "")


def describe() -> dict[str, Any]:
    """CPU, cores, memory, OS, Python and the versions of what the figures depend on."""
    versions = {
        name: _version(name)
        for name in ("cnnserve", "onnxruntime-gpu", "onnxruntime", "grpcio", "protobuf", "numpy")
    }
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "git": _git(),
        "versions": {k: v for k, v in versions.items() if v is not None},
    }


def _machine_busy_s() -> float:
    """Seconds of CPU the whole machine has spent busy (not idle or waiting on I/O)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _TICK


def _tree_cpu_s(root: int) -> float:
    """CPU seconds of `root` and all its descendants now alive (servers and their workers)."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICK
    ours, grew = {root}, True
    while grew:
        found = {pid for pid, ppid in parent.items() if ppid in ours} - ours
        ours |= found
        grew = bool(found)
    return sum(cpu.get(pid, 0.0) for pid in ours)


def _ours_s() -> float:
    """This process and its descendants: those alive from /proc, those ended from rusage."""
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    return _tree_cpu_s(os.getpid()) + ended.ru_utime + ended.ru_stime


@dataclass
class Background:
    """How many cores processes outside this run kept busy between `start` and `cores`.

    This run is the bench process and every process under it (servers, their
    workers, exports); other sessions' tests, say, are the background.
    """

    machine_s: float = 0.0
    ours_s: float = 0.0
    wall_s: float = 0.0

    def start(self) -> Background:
        self.machine_s, self.ours_s = _machine_busy_s(), _ours_s()
        self.wall_s = time.monotonic()
        return self

    def cores(self) -> float:
        wall = time.monotonic() - self.wall_s
        others = (_machine_busy_s() - self.machine_s) - (_ours_s() - self.ours_s)
        return round(max(0.0, others) / wall, 2) if wall else 0.0


@dataclass
class QuietGate:
    """Waits, before each measurement, until other processes leave the cores alone.

    Other sessions' work comes in bursts on a shared machine; a level measured in
    a burst says little. The wait is bounded by `budget_s` over the whole run, so
    that a machine that is never quiet costs at most that.
    """

    budget_s: float
    threshold_cores: float = 0.25
    waited_s: float = 0.0

    def wait(self) -> float:
        """Seconds waited this time (0 when already quiet or out of budget)."""
        started = time.monotonic()
        quiet = 0
        while quiet < 2 and self.waited_s + (time.monotonic() - started) < self.budget_s:
            probe = Background().start()
            time.sleep(0.5)
            quiet = quiet + 1 if probe.cores() < self.threshold_cores else 0
        spent = time.monotonic() - started
        self.waited_s += spent
        return spent
