"""The training process's heap: with ``keep_freed_buffers`` big buffers freed at the end of one
step are largely reused by the next; with glibc's defaults every page of them faults in afresh."""
from __future__ import annotations

import json
import subprocess
import sys

BUFFERS_MIB = (96, 128, 64)  # each above glibc's largest automatic mmap threshold (32 MiB)
PAGES = sum(BUFFERS_MIB) * 2 ** 20 // 4096

# steps that each allocate and fill the buffers, then free them; the minor faults of each step
STEPS = f"""
import json, resource, sys, torch
from nlbfab.memory import keep_freed_buffers
took_effect = keep_freed_buffers() if sys.argv[1] == "keep" else None
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [torch.empty(mib * 2 ** 18).fill_(1.0) for mib in {BUFFERS_MIB}]
    del buffers
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"took_effect": took_effect, "faults": faults}}))
"""


def faults_per_step(setting: str) -> dict:
    result = subprocess.run([sys.executable, "-c", STEPS, setting], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.splitlines()[-1])


def test_big_buffers_freed_by_one_step_are_reused_by_the_next_only_where_the_heap_keeps_them():
    default, kept = faults_per_step("default"), faults_per_step("keep")
    assert kept["took_effect"] is True
    # the first step maps its buffers in either way; after it, glibc's defaults map them afresh every step
    assert all(faults > 0.9 * PAGES for faults in default["faults"])
    assert kept["faults"][0] > 0.9 * PAGES
    # the heap reuses most of them (a buffer a bit too large for a freed slot still maps anew)
    assert sum(kept["faults"][1:]) < 0.5 * sum(default["faults"][1:])
