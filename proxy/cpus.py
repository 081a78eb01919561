"""How many CPUs this process may use: its affinity, capped by its cgroup's CPU quota.

``sched_getaffinity`` does not see a container's quota: on a 16-CPU node with
``limits.cpu: 1`` it says 16. The quota lives in the process's own cgroup (from
``/proc/self/cgroup``): cgroup v2 ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD"), cgroup v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none); a parent cgroup's quota binds too.
The roots are parameters so tests can hand in a fake tree.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def workers_auto(
    proc: str | Path = "/proc", cgroup: str | Path = "/sys/fs/cgroup", affinity: int | None = None
) -> tuple[int, str]:
    """(workers, why): min(affinity, ceil(quota / period)), at least 1."""
    cpus = len(os.sched_getaffinity(0)) if affinity is None else affinity
    quota = cpu_quota(Path(proc), Path(cgroup))
    if quota is None:
        return max(1, cpus), f"{cpus} CPUs, no CPU quota"
    q, period = quota
    return max(1, min(cpus, math.ceil(q / period))), f"CPU quota {q}/{period} of {cpus} CPUs"


def cpu_quota(proc: Path, cgroup: Path) -> tuple[int, int] | None:
    """The tightest (quota, period) on the process's cgroup and its parents; None: no quota."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    found: list[tuple[int, int]] = []
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "" and line.startswith("0::"):
            found += _v2(cgroup, path)
        elif "cpu" in controllers.split(","):
            found += _v1(cgroup, path)
    return min(found, key=lambda qp: qp[0] / qp[1]) if found else None


def _ancestors(base: Path, path: str) -> list[Path]:
    """The cgroup's folder and each parent up to the mount; a container (cgroup namespace or
    not) may show a path that does not exist under its own mount: then the mount itself."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    dirs = [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _v2(cgroup: Path, path: str) -> list[tuple[int, int]]:
    out = []
    for d in _ancestors(cgroup, path):
        try:
            quota, period = (d / "cpu.max").read_text().split()[:2]
            if quota != "max" and int(quota) > 0 and int(period) > 0:
                out.append((int(quota), int(period)))
        except (OSError, ValueError):
            continue
    return out


def _v1(cgroup: Path, path: str) -> list[tuple[int, int]]:
    out = []
    for name in V1_CPU_DIRS:
        for d in _ancestors(cgroup / name, path):
            try:
                quota = int((d / "cpu.cfs_quota_us").read_text())
                period = int((d / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            if quota > 0 and period > 0:
                out.append((quota, period))
    return out
