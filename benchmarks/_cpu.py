"""CPU and memory accounting from ``/proc``: this process, the worker processes, the
whole cluster (own cluster only: the postmaster and its children), and the machine's idle
time, which tells other load on the machine apart."""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import time
from pathlib import Path

from benchmarks._base import BenchmarkError

CLK_TCK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1  # /proc/stat's idle counts every online CPU


def stat_fields(pid: int | str) -> list[str] | None:
    """``/proc/<pid>/stat`` from field 3 (state) on, or None when the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_cpu_seconds(pid: int, kernel_only: bool = False) -> float:
    """utime + stime of a process (or stime only), in seconds."""
    fields = stat_fields(pid)
    if fields is None:
        return math.nan
    # after the ")": index 0 is field 3; utime=14, stime=15
    if kernel_only:
        return int(fields[12]) / CLK_TCK
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def postgres_cpu_seconds(postmaster: int) -> float:
    """Cumulative CPU of the whole cluster: the postmaster, its reaped children (cutime,
    cstime) and its live children. Backends do not fork, so this only grows, except that
    a backend which has exited but is not reaped yet is missing: read it while the
    backends are alive, or once they are all gone."""
    own = stat_fields(postmaster)
    if own is None:
        return math.nan
    ticks = sum(int(own[i]) for i in (11, 12, 13, 14))  # utime, stime, cutime, cstime
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = stat_fields(entry.name)
        if fields is not None and int(fields[1]) == postmaster:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def machine_idle_seconds() -> float:
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(first[4]) + int(first[5])) / CLK_TCK  # idle + iowait, summed over cores


def children_cpu() -> float:
    """CPU of this process's reaped children (pgbench, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def status_kib(pid: int, key: str) -> int:
    """A field of /proc/<pid>/status in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchmarkError(f"no {key} in /proc/{pid}/status")


@dataclasses.dataclass
class CpuSample:
    """Cumulative CPU seconds at one moment; subtract two for a window."""

    wall: float
    python: float  # this process
    postgres: float  # the whole cluster (NaN without our own cluster)
    idle: float  # the machine, summed over cores

    @classmethod
    def take(cls, postmaster: int | None) -> CpuSample:
        return cls(
            wall=time.monotonic(),
            python=time.process_time(),
            postgres=postgres_cpu_seconds(postmaster) if postmaster else math.nan,
            idle=machine_idle_seconds(),
        )
