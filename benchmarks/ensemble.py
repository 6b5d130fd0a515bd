"""Ensembles: wall time of ``--ensemble K`` against its K members trained one after another, and
the val co-bps of the best member, the mean member and the ensemble, side by side in one run.

For each split: single runs seeded 0, 1, ... (today's default model is seed 0; the first K of
them are the K members trained one after another), and one ``nlbfab-train --ensemble K`` run
per K (members seeded 0..K-1) with ``--ensemble-top K``: the ensemble is the greedy choice on
val of at most K members ("chosen" of them). Every run stops by the default rules. The splits
must be preprocessed (PREP_HOME); options after ``--`` go to every run (e.g. ``-- --max-epochs 50``).
``--epoch-cost`` instead times one epoch (training and validation) of K members on mc_maze-shaped
tensors (1721 train trials, batch 64), no data needed: the cost of a step with every member
training, before any has stopped, with its matmul FLOPs against the machine's matmul peak.
``--step-cost`` times one training step (the model's training loss, forward and backward) of K
members on random mc_maze_small-shaped batches (20 ms: 107 held-in and 35 held-out units, 35 + 10
bins), batched as a run steps them (the model's ``apply_members`` / ``training_loss_members``)
and one after another, side by side, on the GPU where there is one.

    .venv/bin/python benchmarks/ensemble.py [--splits mc_maze_small-20ms-val] [--members 1 4 8]
    .venv/bin/python benchmarks/ensemble.py --epoch-cost [--bins 20 5]
    .venv/bin/python benchmarks/ensemble.py --step-cost [--models lfads sae] [--batches 16 64] [--members 4 8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from benchmarks.common import (description, device_description, matmul_peak_gflops, positive_int,  # noqa: E402
                               run_main, save, table)

from nlbfab import config  # noqa: E402

SPLITS = [f"{d}-{b}ms-val" for b in ("20", "05") for d in ("mc_maze_small", "mc_maze_medium", "mc_maze")]


def train(split: str, tag: str, options: list[str]) -> tuple[float, dict]:
    """Wall seconds of one ``nlbfab-train`` run and its ``metrics.json``."""
    started = time.perf_counter()
    subprocess.run([str(ROOT / "bin" / "nlbfab-train"), "--split", split, "--run-tag", tag, "--quiet", *options],
                   check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    return seconds, json.loads((config.runs_home() / tag / split / "metrics.json").read_text())


def epoch_seconds(data, members: int, epochs: int = 3) -> float:
    """The fastest of ``epochs`` timed epochs (after a warm-up) of ``members`` SAEs on ``data``,
    mc_maze-shaped tensors (``train_throughput.py``'s loop and data)."""
    from benchmarks.train_throughput import nlbfab_epochs
    return min(nlbfab_epochs(data, epochs + 1, "32-true", False, "cpu", ensemble=members)[1:])


def epoch_cost(bins: list[int], members: list[int]) -> None:
    """Seconds per epoch of K members, and what arithmetic alone allows: "x one model at peak" is
    the K members' matmul FLOPs at this machine's measured matmul peak over one model's measured
    epoch, the least "x one model" any implementation of these members could reach here."""
    from benchmarks.train_throughput import EVAL, TRAIN, sae_flops, synthetic_split
    peak = matmul_peak_gflops("cpu")
    rows = []
    for bin_ms in bins:
        data = synthetic_split(bin_ms, torch.device("cpu"))
        flops = sae_flops(TRAIN, data.bins, data.fwd_steps, True) + sae_flops(EVAL, data.bins, data.fwd_steps, False)
        one = None
        for count in members:
            seconds = epoch_seconds(data, count)
            one = one or seconds
            gflops = count * flops / 1e9
            rows.append({"bins": f"{bin_ms} ms", "K": count, "s/epoch": seconds, "x one model": seconds / one,
                         "x per member": seconds / one / count, "GFLOP/s": gflops / seconds,
                         "% peak": 100 * gflops / seconds / peak, "x one model at peak": gflops / peak / one})
            print(table(rows[-1:], list(rows[-1])), flush=True)
    print(f"device: {device_description()}; float32 matmul peak {peak:.1f} GFLOP/s")
    print(table(rows, list(rows[0])))
    print(f"saved {save('ensemble-epoch-cost', {'device': device_description(), 'peak_gflops': peak, 'rows': rows})}")


def step_seconds(model, members: list[dict], batch: tuple, batched: bool, repeats: int = 7) -> float:
    """The fastest of ``repeats`` training steps (after one) of ``members`` on ``batch``: their
    summed training loss, forward and backward, batched or one member after another."""
    from nlbfab.loss import poisson_nll
    heldin, target = batch
    fwd_steps = target.shape[1] - heldin.shape[1]

    def losses(chosen):
        if model.training_loss:
            return model.training_loss_members(chosen, heldin, target, dropout=0.2, epoch=0)[0]
        logrates, _ = model.apply_members(chosen, heldin, fwd_steps, dropout=0.2, training=True)
        return torch.stack([poisson_nll(rates, target) for rates in logrates])
    seconds = []
    for _ in range(repeats + 1):
        _sync(heldin.device)
        started = time.perf_counter()
        total = losses(members) if batched else sum(losses([m]).sum() for m in members)
        total.sum().backward()
        _sync(heldin.device)
        seconds.append(time.perf_counter() - started)
    return min(seconds[1:])


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_cost(models: list[str], batches: list[int], counts: list[int]) -> None:
    """Milliseconds of a training step of K members batched and one after another."""
    from nlbfab.models import Sizes, get_model
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    heldin, heldout, bins, fwd = 107, 35, 35, 10  # mc_maze_small at 20 ms
    g = torch.Generator().manual_seed(0)
    sizes = Sizes(heldin, heldout, bins, fwd, torch.full((heldin + heldout,), 0.3))
    rows = []
    for name in models:
        model = get_model(name)
        hparams = model.settle({}, "mc_maze_small", with_splits=False)
        for size in batches:
            target = torch.poisson(torch.full((size, bins + fwd, heldin + heldout), 0.3), generator=g).to(device)
            batch = (target[:, :bins, :heldin].contiguous(), target)
            for count in counts:
                members = [{k: v.to(device).requires_grad_(k not in model.fixed)
                            for k, v in model.init(sizes, seed, **hparams).items()} for seed in range(count)]
                in_turn, batched = (step_seconds(model, members, batch, b) for b in (False, True))
                rows.append({"model": name, "batch": size, "K": count, "in turn ms": 1e3 * in_turn,
                             "batched ms": 1e3 * batched, "x faster": in_turn / batched})
                print(table(rows[-1:], list(rows[-1])), flush=True)
    print(f"device: {device_description()}; threads {torch.get_num_threads()}")
    print(table(rows, list(rows[0])))
    print(f"saved {save('ensemble-step-cost', {'device': device_description(), 'rows': rows})}")


def main():
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--splits", nargs="+", default=SPLITS)
    parser.add_argument("--members", nargs="+", type=positive_int, default=[1, 4, 8])
    parser.add_argument("--epoch-cost", action="store_true", help="Time one epoch of K members instead.")
    parser.add_argument("--bins", nargs="+", type=int, choices=[5, 20], default=[20, 5],
                        help="With --epoch-cost: bin widths.")
    parser.add_argument("--step-cost", action="store_true",
                        help="Time a training step of K members, batched and one after another, instead.")
    parser.add_argument("--models", nargs="+", default=["lfads", "sae"], help="With --step-cost: the models.")
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[16, 64],
                        help="With --step-cost: batch sizes.")
    args, passthrough = parser.parse_known_args()
    if args.epoch_cost:
        return epoch_cost(args.bins, args.members)
    if args.step_cost:
        if max(args.members) < 2:
            parser.error("--step-cost compares K members batched with one after another: give --members 2 or more")
        return step_cost(args.models, args.batches, [k for k in args.members if k > 1])
    passthrough = [a for a in passthrough if a != "--"]
    rows = []
    for split in args.splits:
        singles = [train(split, f"bench-ens-seed{seed}", ["--seed", str(seed), *passthrough])
                   for seed in range(max(args.members))]
        one_seconds, one = singles[0]
        for count in args.members:
            seconds, summary = singles[0] if count == 1 else train(
                split, f"bench-ens-{count}", ["--ensemble", str(count), "--ensemble-top", str(count), *passthrough])
            members = ([m["metrics"]["co-bps"] for m in summary["ensemble"]["members"]] if count > 1
                       else [summary["metrics"]["co-bps"]])
            sequential = sum(s for s, _ in singles[:count])
            rows.append({"split": split, "K": count, "seconds": seconds, "x one model": seconds / one_seconds,
                         "one after another s": sequential, "x one after another": seconds / sequential,
                         "epochs": summary["epochs"], "best member": max(members),
                         "mean member": statistics.mean(members), "ensemble": summary["metrics"]["co-bps"],
                         "chosen": len(summary["ensemble"]["chosen"]) if count > 1 else 1,
                         "default model": one["metrics"]["co-bps"]})
            print(table(rows[-1:], list(rows[-1])), flush=True)
    columns = list(rows[0])
    print(f"device: {device_description()}")
    print(table(rows, columns))
    print(f"saved {save('ensemble', {'device': device_description(), 'options': passthrough, 'rows': rows})}")


if __name__ == "__main__":
    run_main(main)
