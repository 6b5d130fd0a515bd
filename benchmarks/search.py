"""Search: ``nlbfab-search`` with ASHA against the default single model and a greedy
``--ensemble 8``, side by side in one run: wall time, trials finished and stopped early, and
the val co-bps of the best trial, of the mean of the top N trials (the search's submission),
of one default model and of eight default members (``--ensemble 8 --ensemble-top 8``: the
greedy choice among them on val).

The splits must be preprocessed (PREP_HOME); options after ``--`` go to every run and trial.

    .venv/bin/python benchmarks/search.py [--splits mc_maze_small-20ms-val] [--trials 32] [--top 5] [--grace-epochs 25]
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

from nlbfab import config, layout  # noqa: E402
from nlbfab.scoring import score  # noqa: E402
from nlbfab.splits import get_split  # noqa: E402

TAG = "bench-search"


def timed(command: str, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run([str(ROOT / "bin" / f"nlbfab-{command}"), *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def trained(split: str, tag: str, options: list[str]) -> tuple[float, float]:
    """Wall seconds and val co-bps of one ``nlbfab-train`` run."""
    seconds = timed("train", "--split", split, "--run-tag", tag, "--quiet", *options)
    metrics = json.loads(layout.metrics_file(config.homes().run_dir(tag, get_split(split))).read_text())
    return seconds, metrics["metrics"]["co-bps"]


def main():
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--splits", nargs="+", default=["mc_maze_small-20ms-val"])
    parser.add_argument("--trials", type=positive_int, default=32)
    parser.add_argument("--top", type=positive_int, default=5)
    parser.add_argument("--grace-epochs", help="nlbfab-search's ASHA first rung (default: nlbfab-search's)")
    args, passthrough = parser.parse_known_args()
    passthrough = [a for a in passthrough if a != "--"]
    homes, rows = config.homes(), []
    for name in args.splits:
        split = get_split(name)
        seconds = timed("search", "--split", name, "--trials", str(args.trials), "--run-tag", TAG,
                        "--submit-top", str(args.top), "--no-test", *passthrough,
                        *(["--grace-epochs", args.grace_epochs] if args.grace_epochs else []))
        trials = json.loads(layout.search_trials(layout.search_dir(homes.tag_dir(TAG), split)).read_text())["trials"]
        statuses = [t["status"] for t in trials]
        top = score(homes.split_file(split, "eval_target"), layout.submission_file(homes.tag_dir(TAG), "val"), split)
        one_seconds, one = trained(name, f"{TAG}-default", passthrough)
        ensemble_seconds, ensemble = trained(name, f"{TAG}-ensemble8",
                                             ["--ensemble", "8", "--ensemble-top", "8", *passthrough])
        rows.append({"split": name, "trials": len(trials), "search s": seconds,
                     "finished": statuses.count("finished"), "stopped by ASHA": statuses.count("stopped"),
                     "best trial": max(t["val_co_bps"] for t in trials if t["val_co_bps"] is not None),
                     f"top {args.top} mean": top["co-bps"], "default model": one, "default s": one_seconds,
                     "ensemble 8": ensemble, "ensemble 8 s": ensemble_seconds})
        print(table(rows[-1:], list(rows[-1])), flush=True)
    print(f"device: {device_description()}")
    print(table(rows, list(rows[0])))
    print(f"saved {save('search', {'device': device_description(), 'options': passthrough, 'rows': rows})}")


if __name__ == "__main__":
    run_main(main)
