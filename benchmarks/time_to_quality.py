"""Time to quality: wall time and epochs until early stopping against a fixed 2,000-epoch
schedule (nlb-lightning's: constant learning rate, no early stopping), with the val co-bps each
reaches. The split must be preprocessed.

    .venv/bin/python benchmarks/time_to_quality.py [--split mc_maze-20ms-val] [--epochs 2000]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import description, device_description, positive_int, run_main, save, table  # noqa: E402

from nlbfab import config  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--split", default="mc_maze-20ms-val")
    parser.add_argument("--epochs", type=positive_int, default=2000)
    args, passthrough = parser.parse_known_args()
    rows = []
    for schedule, options in (("early stopping (defaults)", []),
                              (f"fixed {args.epochs} epochs", ["--max-epochs", str(args.epochs),
                                                               "--patience", str(args.epochs), "--lr-decay", "1"])):
        tag = "bench-ttq-" + ("early" if not options else "fixed")
        started = time.perf_counter()
        subprocess.run([str(ROOT / "bin" / "nlbfab-train"), "--split", args.split, "--run-tag", tag, "--quiet",
                        *options, *passthrough], check=True, stdout=subprocess.DEVNULL)
        run_dir = config.runs_home() / tag / args.split
        summary = json.loads((run_dir / "metrics.json").read_text())
        rows.append({"schedule": schedule, "batch": json.loads((run_dir / "config.json").read_text())["batch_size"],
                     "epochs": summary["epochs"], "best epoch": summary["best_epoch"],
                     "seconds": time.perf_counter() - started, "loop seconds": summary["seconds"],
                     "co-bps": summary["metrics"]["co-bps"]})
    rows[0]["sooner"] = rows[1]["seconds"] / rows[0]["seconds"]
    print(f"device: {device_description()}; split {args.split}")
    print(table(rows, ["schedule", "batch", "epochs", "best epoch", "seconds", "loop seconds", "co-bps", "sooner"]))
    result = {"device": device_description(), "split": args.split, "rows": rows}
    print(f"saved {save(f'time_to_quality-{args.split}', result)}")


if __name__ == "__main__":
    run_main(main)
