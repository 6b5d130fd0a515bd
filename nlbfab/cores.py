"""The CPU cores this process may use."""
from __future__ import annotations

import os


def available_cpus() -> int:
    """The cores of this process's CPU affinity (taskset, a batch job's allocation, a container's
    cpuset), which ``os.cpu_count`` ignores; all of them where the system has no affinity."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
