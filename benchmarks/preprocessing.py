"""Preprocessing: ``nlbfab-prep``'s native engine against its nlb_tools engine, on the synthetic
``--scale full`` data: wall time, peak memory of the whole process tree, and whether both wrote
the same tensors.

Make the data first: ``bin/nlbfab-synth --all --scale full`` (into DATA_HOME; point DATA_HOME
elsewhere to keep the demo's data). Each engine runs as its own ``nlbfab-prep`` process into a
temporary PREP_HOME, one after the other, while this script samples the resident memory of the
process and its children every 0.1 s (Linux ``/proc``; the kernel's peak of the largest
process is the floor). Then every array of every file is compared: spike counts, masks,
condition indices and jitter must be equal; the largest relative difference of the other
floats (behaviour, PSTHs) is reported. All 28 splits take about 10 minutes with nlb_tools on 2
cores; ``--datasets`` picks fewer.

    .venv/bin/python benchmarks/preprocessing.py [--datasets mc_maze_small mc_maze]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import description, device_description, run_main, save, table  # noqa: E402

from nlbfab.splits import DATASETS, splits_of  # noqa: E402

ENGINES = ("native", "nlb_tools")  # the larger last: the kernel's peak then still tells
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> int:
    """Bytes resident in process ``root`` and all its descendants, from ``/proc``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    total = 0
    for pid in tree:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            pass
    return total


def measured(command: list[str], prep_home: str) -> dict:
    """Run ``command`` with ``PREP_HOME=prep_home``: wall seconds and peak GB of its process tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, "PREP_HOME": prep_home},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read()}")
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    return {"seconds": seconds, "peak GB": max(peak, largest if largest > before * 1024 else 0) / 1e9}


def _arrays(path: Path) -> dict[str, np.ndarray]:
    found = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, item: found.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
    return found


def parity(native: Path, reference: Path, splits) -> dict:
    """Every array of every file: how many, how many differ where they must be equal (with the
    first few named), the largest relative difference of behaviour and PSTHs."""
    arrays, unequal, largest = 0, [], 0.0
    for split in splits:
        for path in sorted((reference / split.name).glob("*.h5")):
            theirs, ours = _arrays(path), _arrays(native / split.name / path.name)
            if sorted(ours) != sorted(theirs):
                unequal.append(f"{split.name}/{path.name}: keys")
                continue
            for key, expected in theirs.items():
                arrays += 1
                got = ours[key]
                if expected.dtype == object:
                    same = len(got) == len(expected) and all(map(np.array_equal, got, expected))
                elif got.shape != expected.shape or got.dtype != expected.dtype:
                    same = False
                elif np.issubdtype(expected.dtype, np.floating) and "spikes" not in key:
                    differs = np.abs(got - expected)[expected != 0] / np.abs(expected[expected != 0])
                    largest = max(largest, float(np.nanmax(differs, initial=0)))
                    same = np.array_equal(np.isnan(got), np.isnan(expected)) and np.array_equal(got == 0, expected == 0)
                else:
                    same = np.array_equal(got, expected, equal_nan=expected.dtype.kind == "f")
                if not same:
                    unequal.append(f"{split.name}/{path.name}:{key}")
    return {"arrays": arrays, "unequal": len(unequal), "unequal arrays": unequal[:10],
            "largest relative difference (behaviour, PSTH)": largest}


def main():
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    args = parser.parse_args()
    command = [str(ROOT / "bin" / "nlbfab-prep"), *sum((["--dataset", d] for d in args.datasets), [])]
    splits = [s for d in args.datasets for s in splits_of(DATASETS[d])]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for engine in ENGINES:
            result = measured([*command, "--engine", engine], os.path.join(work, engine))
            rows.append({"engine": engine, "splits": len(splits), **result})
            print(table(rows[-1:], list(rows[-1])), flush=True)
        same = parity(Path(work, "native"), Path(work, "nlb_tools"), splits)
    native, reference = rows
    rows.append({"engine": "native / nlb_tools", "seconds": native["seconds"] / reference["seconds"],
                 "peak GB": native["peak GB"] / reference["peak GB"]})
    print(f"\ndevice: {device_description()}; datasets: {' '.join(args.datasets)}\n"
          + table(rows, ["engine", "splits", "seconds", "peak GB"]))
    print(f"\n{reference['seconds'] / native['seconds']:.1f}x faster, {reference['peak GB'] / native['peak GB']:.1f}x "
          f"less memory; {same['arrays']} arrays compared, {same['unequal']} unequal, largest relative difference "
          f"of behaviour and PSTHs {same['largest relative difference (behaviour, PSTH)']:.1e}")
    for name in same["unequal arrays"]:
        print(f"  unequal: {name}")
    payload = {"device": device_description(), "datasets": args.datasets, "rows": rows, "parity": same}
    print(f"saved {save('preprocessing', payload)}")
    if same["unequal"]:
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
