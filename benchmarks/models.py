"""Models side by side: the SAE, gru_readout and LFADS against spike smoothing and the oracle
(the true rates) on synthetic data, with all of a split's NLB metrics, epochs and wall time.

Each dataset is synthesized (``--variability``, ``--scale``) and its splits of ``--phases``
preprocessed in a working folder; every model then trains with ``nlbfab-train``'s defaults (or
``--max-epochs``) one after another, each with ``--threads`` torch threads; each run and
baseline is scored on its submission as EvalAI would (a test split against EvalAI's copy of the
synthetic test file: ``nlbfab.scoring.local_target``). Prints one table and saves it under ``benchmarks/results/``.
``--epoch-cost`` instead times one epoch (training and validation) of each model on mc_maze-shaped
tensors (``train_throughput.py``'s loop and data: 1721 train trials in batches of 64), no data needed.

    .venv/bin/python benchmarks/models.py --datasets mc_maze --bins 20 --variability realistic
    .venv/bin/python benchmarks/models.py --datasets mc_maze_small --bins 20 --phases val,test --scale full
    .venv/bin/python benchmarks/models.py --epoch-cost --bins 20,5 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import description, device_description, positive_int, run_main, save, table  # noqa: E402

MODELS = ("sae", "gru_readout", "lfads")
METRICS = ("co-bps", "vel R2", "tp corr", "psth R2", "fp-bps")


def nlbfab(env: dict, *args: str) -> str:
    """Run an nlbfab command; its output, or exit with its last lines on a failure."""
    done = subprocess.run([sys.executable, "-m", "nlbfab.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args[:3])} failed:\n" + "\n".join((done.stdout + done.stderr).splitlines()[-15:]))
    return done.stdout + done.stderr


def submission_scores(homes, target, tag: str, split_name: str) -> dict[str, float]:
    """A run's submission of the split's phase scored on ``split_name`` as EvalAI would."""
    from nlbfab.layout import submission_file
    from nlbfab.scoring import score
    from nlbfab.splits import get_split
    split = get_split(split_name)
    return score(target, submission_file(homes.tag_dir(tag), split.phase), split)


def epoch_cost(bins: list[int], models: list[str], threads: int, epochs: int = 3) -> None:
    """The fastest of ``epochs`` timed epochs (after a warm-up) of each model, as a multiple of the
    SAE's (the first model)."""
    import torch

    from benchmarks.train_throughput import nlbfab_epochs, synthetic_split
    torch.set_num_threads(threads)
    rows = []
    for bin_ms in bins:
        data = synthetic_split(bin_ms, torch.device("cpu"))
        first = None
        for model in models:
            seconds = min(nlbfab_epochs(data, epochs + 1, "32-true", False, "cpu", model=model)[1:])
            first = first or seconds
            rows.append({"bins": f"{bin_ms} ms", "model": model, "s/epoch": seconds, f"x {models[0]}": seconds / first})
            print(table(rows[-1:], list(rows[-1])), flush=True)
    print(f"device: {device_description()}")
    print(table(rows, list(rows[0])))
    print(f"saved {save('models-epoch-cost', {'device': device_description(), 'threads': threads, 'rows': rows})}")


def main() -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--datasets", default="mc_maze", help="comma-separated (default mc_maze)")
    parser.add_argument("--bins", default="20", help="comma-separated bin widths: 5, 20 (default 20)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})")
    parser.add_argument("--variability", default="realistic", choices=["low", "realistic"])
    parser.add_argument("--scale", default="small", choices=["tiny", "small", "full"])
    parser.add_argument("--phases", default="val", help="comma-separated: val, test (default val)")
    parser.add_argument("--max-epochs", type=positive_int, help="cap on every run's epochs (default: nlbfab-train's)")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="torch threads of each run")
    parser.add_argument("--workdir", type=Path, help="data and runs here (default: a temporary folder)")
    parser.add_argument("--epoch-cost", action="store_true", help="Time one epoch of each model instead.")
    args = parser.parse_args()
    try:
        [int(b) for b in args.bins.split(",")]
    except ValueError:
        parser.error(f"--bins {args.bins}: comma-separated bin widths, e.g. 20 or 20,5")
    if args.epoch_cost:
        return epoch_cost([int(b) for b in args.bins.split(",")], args.models.split(","), args.threads)
    from nlbfab.layout import Homes, metrics_file
    from nlbfab.models import get_model
    from nlbfab.scoring import local_target
    from nlbfab.splits import get_split
    for dataset in args.datasets.split(","):  # every split and model named checked before any work
        for split in [f"{dataset}-{int(b):02d}ms-{p}" for b in args.bins.split(",") for p in args.phases.split(",")]:
            get_split(split)
    for model in args.models.split(","):
        get_model(model)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nlbfab-models-"))
    homes = Homes(workdir / "dandi", workdir / "prep", workdir / "runs")
    env = {**os.environ, "DATA_HOME": str(homes.data), "PREP_HOME": str(homes.prep), "RUNS_HOME": str(homes.runs),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for dataset in args.datasets.split(","):
        nlbfab(env, "synth", "--dataset", dataset, "--scale", args.scale, "--variability", args.variability)
        for split in [f"{dataset}-{int(b):02d}ms-{p}" for b in args.bins.split(",") for p in args.phases.split(",")]:
            nlbfab(env, "prep", "--split", split)
            target = local_target(homes, get_split(split), print)
            for method in ("oracle", "smoothing"):
                nlbfab(env, "baseline", "--split", split, "--method", method, "--run-tag", method)
                rows.append({"split": split, "run": method, **submission_scores(homes, target, method, split)})
            oracle = rows[-2]
            for model in args.models.split(","):
                started = time.perf_counter()
                cap = ["--max-epochs", str(args.max_epochs)] if args.max_epochs is not None else []
                nlbfab(env, "train", "--split", split, "--model", model, "--run-tag", model, "--quiet", *cap)
                seconds = time.perf_counter() - started
                summary = json.loads(metrics_file(homes.tag_dir(model) / split).read_text())
                rows.append({"split": split, "run": model, **summary["metrics"], "epochs": summary["epochs"],
                             "seconds": seconds})
            for row in rows[-2 - len(args.models.split(",")):]:
                row["of oracle"] = f"{100 * row['co-bps'] / oracle['co-bps']:.0f}%"
            print(table(rows[-2 - len(args.models.split(",")):],
                        ["split", "run", *[m for m in METRICS if m in oracle], "of oracle", "epochs", "seconds"]),
                  flush=True)
    print(f"\ndevice: {device_description()}, {args.threads} threads a run; {args.variability} variability, "
          f"--scale {args.scale}; data and runs in {workdir}")
    print(table(rows, ["split", "run", *METRICS, "of oracle", "epochs", "seconds"]))
    name = f"models-{args.variability}-{args.datasets.replace(',', '+')}-{args.bins.replace(',', '+')}ms" \
        + ("" if args.phases == "val" else f"-{args.phases.replace(',', '+')}")
    print(f"saved {save(name, {'device': device_description(), 'args': vars(args) | {'workdir': str(workdir)}, 'rows': rows})}")


if __name__ == "__main__":
    run_main(main)
