"""Preprocessing: wall time and peak memory of ``nlbfab-prep`` (one load per dataset) against one
load per split (``nlbfab-prep --split X`` for each split), on the synthetic ``--scale full`` data.

Make the data first: ``bin/nlbfab-synth --all --scale full`` (DATA_HOME). Each variant runs in
its own process so its peak RSS is its own. All 28 splits take tens of minutes per variant on
2 cores; ``--datasets`` picks fewer.

    .venv/bin/python benchmarks/preprocessing.py [--datasets mc_maze_large mc_rtt]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import save, table  # noqa: E402

from nlbfab.splits import DATASETS, splits_of  # noqa: E402


def run_commands(commands: list[list[str]]) -> dict:
    """Run ``commands`` one after another; wall seconds and the peak RSS of any of them."""
    started = time.perf_counter()
    for command in commands:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"seconds": time.perf_counter() - started,
            "peak GB": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6}


def measured(commands: list[list[str]], prep_home: str) -> dict:
    """``run_commands`` in a fresh process, so that each variant's peak memory is its own."""
    env = {**os.environ, "PREP_HOME": prep_home}
    done = subprocess.run([sys.executable, __file__, "--run-commands", json.dumps(commands)], env=env,
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--run-commands", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_commands:
        print(json.dumps(run_commands(json.loads(args.run_commands))))
        return
    prep = str(ROOT / "bin" / "nlbfab-prep")
    rows = []
    for variant in ("one load per dataset (nlbfab-prep)", "one load per split"):
        with tempfile.TemporaryDirectory() as prep_home:
            if variant.startswith("one load per dataset"):
                commands = [[prep, *sum((["--dataset", d] for d in args.datasets), [])]]
            else:
                commands = [[prep, "--split", s.name] for d in args.datasets for s in splits_of(DATASETS[d])]
            result = measured(commands, prep_home)
        rows.append({"variant": variant, "splits": 4 * len(args.datasets), **result})
        print(table(rows[-1:], list(rows[-1])), flush=True)
    print("\n" + table(rows, ["variant", "splits", "seconds", "peak GB"]))
    print(f"saved {save('preprocessing', {'datasets': args.datasets, 'rows': rows})}")


if __name__ == "__main__":
    main()
