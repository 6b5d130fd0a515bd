"""Sweep: wall time of ``nlbfab-all`` on a subset of splits against running ``nlbfab-train`` on
the same splits one after another, same options (data must be preprocessed or synthesizable).

    .venv/bin/python benchmarks/sweep.py [--datasets mc_maze_small mc_rtt] [--bins 20] [--max-epochs 20]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import description, device_description, positive_int, run_main, save, table  # noqa: E402

from nlbfab.splits import ALL_SPLITS  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--datasets", nargs="+", default=["mc_maze_small", "mc_rtt"])
    parser.add_argument("--bins", nargs="+", default=["20"])
    parser.add_argument("--max-epochs", type=positive_int, default=20)
    args, passthrough = parser.parse_known_args()
    options = ["--max-epochs", str(args.max_epochs), "--log-every-n-epochs", "1000", *passthrough]
    splits = [s.name for s in ALL_SPLITS if s.dataset.name in args.datasets and str(s.bin_ms) in args.bins]
    rows = []
    started = time.perf_counter()
    subprocess.run([str(ROOT / "bin" / "nlbfab-all"), "--datasets", ",".join(args.datasets), "--bins", ",".join(args.bins),
                    "--run-tag", "bench-sweep", *options], check=True, stdout=subprocess.DEVNULL)
    rows.append({"how": "nlbfab-all", "splits": len(splits), "seconds": time.perf_counter() - started})
    started = time.perf_counter()
    for split in splits:
        subprocess.run([str(ROOT / "bin" / "nlbfab-train"), "--split", split, "--run-tag", "bench-sequential", "--quiet",
                        *options], check=True, stdout=subprocess.DEVNULL)
    rows.append({"how": "one after another", "splits": len(splits), "seconds": time.perf_counter() - started})
    rows[0]["speed-up"] = rows[1]["seconds"] / rows[0]["seconds"]
    print(f"device: {device_description()}; splits: {', '.join(splits)}")
    print(table(rows, ["how", "splits", "seconds", "speed-up"]))
    print(f"saved {save('sweep', {'device': device_description(), 'splits': splits, 'rows': rows})}")


if __name__ == "__main__":
    run_main(main)
