"""Do a model's inferred inputs find the input pulses of a synthetic dataset?

``realistic`` synthetic data (``nlbfab-synth --variability realistic``) pushes every trial off its
condition's path with input pulses at random times (``nlbfab.synth.Variability``), the
perturbations LFADS's controller exists to infer. For each run of a model that infers inputs
(``nlbfab.models``: ``inferred_inputs``) under ``--workdir``'s runs, this scores the posterior
means of its best checkpoint's inferred inputs (the first member's) on the eval trials' windows
against the true pulses:

- ``R2``: how much of the variance of the pulses' responses (what they add to the latents along
  the input directions, the mean of each bin) a ridge map from the inferred inputs of the bins
  around each bin (``LAGS_MS``) explains, fit on half the eval trials and scored on the other
  half, both ways round; ``R2 shuffled``, the same with the trials' pulses shuffled against
  their inputs, is the chance level;
- ``peak x``: the inputs' size (root mean square over inputs) in the bin of a kick and the next
  ``PEAK_MS``, at its largest, over their size in bins without a kick within ``QUIET_MS``, for
  the kicks in the top half by size: how far a pulse stands out in what the model infers.

Reads a ``models.py --workdir`` or any folder with ``dandi``, ``prep`` and ``runs``:

    .venv/bin/python benchmarks/inputs.py --workdir W --datasets mc_maze --bins 20
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import (add_workdir_options, description, device_description, run_main,  # noqa: E402
                               save, table, workdir_homes)
from benchmarks.forecast import binned, eval_window_starts, realistic_files  # noqa: E402

LAGS_MS = (-100, 100)  # each bin's pulse response is decoded from the inputs of these ms around it
PEAK_MS = 40
QUIET_MS = 100
UNSUPPORTED = {"dmfc_rsg": "its eval windows vary in length"}


def best_params(run_dir: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The model's name and the first member's parameters (trained and fixed) from ``best.ckpt``."""
    model = json.loads((run_dir / "config.json").read_text())["model"]
    weights = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["model"]
    params = {}
    for prefix in ("members.0.params.", "members.0.fixed_"):
        params |= {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}
    return model, params


def lagged(x: np.ndarray, low: int, high: int) -> np.ndarray:
    """``(trials, bins, dims)`` -> ``(trials, bins, dims * (high - low + 1))``: each bin with the
    bins ``low`` to ``high`` away from it (zeros beyond the window)."""
    bins = x.shape[1]
    padded = np.pad(x, ((0, 0), (-low, high), (0, 0)))
    return np.concatenate([padded[:, s:s + bins] for s in range(high - low + 1)], -1)


def decoding_r2(inputs: np.ndarray, pulses: np.ndarray, bin_ms: int) -> float:
    """Two-fold (halves of the trials) R2 of a ridge map from the lagged inputs to the pulses."""
    from nlbfab.ridge import fit_and_eval_decoder
    x = lagged(inputs, LAGS_MS[0] // bin_ms, LAGS_MS[1] // bin_ms)
    half = len(x) // 2
    scores = []
    for fit, score in ((slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))):
        flat = [a[part].reshape(-1, a.shape[-1]) for part in (fit, score) for a in (x, pulses)]
        scores.append(fit_and_eval_decoder(*flat))
    return float(np.mean(scores))


def peak_ratio(inputs: np.ndarray, kicks: np.ndarray, bin_ms: int) -> float:
    """The inputs' largest size within ``PEAK_MS`` of each of the larger half of the kicks, mean
    over them, over the mean size in bins that no kick came within ``QUIET_MS`` before."""
    size = np.sqrt(np.mean(inputs ** 2, -1))
    kick = np.linalg.norm(kicks, axis=-1)
    trials, bins = np.nonzero(kick)
    large = kick[trials, bins] >= np.median(kick[trials, bins])
    reach = PEAK_MS // bin_ms
    peaks = [size[t, b:b + reach + 1].max() for t, b in zip(trials[large], bins[large])]
    recent = lagged((kick > 0)[..., None].astype(float), -(QUIET_MS // bin_ms), 0).any(-1)
    return float(np.mean(peaks) / size[~recent].mean())


def eval_pulses(session, dataset: str, bin_ms: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The pulses' kicks (summed) and responses (averaged) in each bin of each eval window, both
    ``(trials, bins, input dims)``."""
    starts, window_ms = eval_window_starts(session.trials, dataset, bin_ms)
    kicks, responses = (binned(np.stack([at_ms[s:s + window_ms] for s in starts]), bin_ms)
                        for at_ms in (session.fluctuation.kicks, session.fluctuation.pulses))
    assert kicks.shape[1] == bins, (kicks.shape, bins)
    return kicks, responses / bin_ms


def input_rows(homes, datasets: list[str], bins: list[int], seed: int) -> list[dict]:
    from nlbfab.data import load_split
    from nlbfab.models import get_model
    from nlbfab.splits import get_split
    rows = []
    for name in datasets:
        files, _ = realistic_files(homes, name, UNSUPPORTED)
        for bin_ms in bins:
            split = get_split(f"{name}-{bin_ms:02d}ms-val")
            data = load_split(split, homes)
            kicks, pulses = eval_pulses(files["train"], name, bin_ms, data.bins)
            shuffled = pulses[np.random.default_rng(seed).permutation(len(pulses))]
            for run_dir in sorted(homes.runs.glob(f"*/{split.name}/checkpoints/best.ckpt")):
                run_dir = run_dir.parent.parent
                model_name, params = best_params(run_dir)
                model = get_model(model_name)
                if model.inferred_inputs is None:
                    continue
                with torch.no_grad():
                    inputs = model.inferred_inputs(params, data.eval_heldin, data.fwd_steps)[:, :data.bins].numpy()
                rows.append({"split": split.name, "run": run_dir.parent.name, "inputs": inputs.shape[-1],
                             "R2": decoding_r2(inputs, pulses, bin_ms),
                             "R2 shuffled": decoding_r2(inputs, shuffled, bin_ms),
                             "peak x": peak_ratio(inputs, kicks, bin_ms)})
                print(table(rows[-1:], list(rows[-1])), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    add_workdir_options(parser)
    parser.add_argument("--seed", type=int, default=0, help="of the shuffle (default 0)")
    args = parser.parse_args()
    homes, datasets, bins = workdir_homes(args)
    rows = input_rows(homes, datasets, bins, args.seed)
    if not rows:
        sys.exit(f"error: no run of a model that infers inputs under {homes.runs}: train one (--model lfads) first")
    print(f"device: {device_description()}\n" + table(rows, list(rows[0])))
    payload = {"device": device_description(), "args": vars(args) | {"workdir": str(args.workdir)}, "rows": rows}
    print(f"saved {save('inputs', payload)}")


if __name__ == "__main__":
    run_main(main)
