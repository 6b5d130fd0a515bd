"""What the truth of a synthetic dataset allows on fp-bps and psth R2: the forecast and the condition path.

On data with single-trial variability (``nlbfab-synth --variability realistic``) the true rates
(the oracle) are out of any model's reach on two of NLB's metrics:

- fp-bps: the 200 ms of forward bins follow the window the model sees, and the variability goes
  on there with slow noise and pulses that no one can know yet. The forecast, the expected rates
  of the forward bins given the truth up to the end of each window (``Fluctuation.futures``,
  averaged over ``--samples`` draws), is what a model that knew every trial's past exactly would
  submit: the best fp-bps there is. A model knows less: it infers the state at the window's end
  from spikes.
- psth R2: the mean rates of a condition's few eval trials against the PSTH of all its trials.
  The condition path, the true rates without the single-trial variability, scores above the true
  rates: the metric rewards leaving out what the trials do on their own.

Reads a ``models.py --workdir`` (its synthesized data, preprocessed val splits and the oracle's
run) and prints, per split, co-bps, psth R2 and fp-bps (over all forward bins, their first and
their last 50 ms) of the oracle, the condition path, the forecast and every run found there.
Not for dmfc_rsg (its eval windows vary in length) nor mc_rtt (its latents are one random
process: the forecast would take it as known).

    .venv/bin/python benchmarks/models.py --datasets mc_maze --bins 20 --scale full --workdir W
    .venv/bin/python benchmarks/forecast.py --workdir W --datasets mc_maze --bins 20
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import (add_workdir_options, description, device_description, positive_int,  # noqa: E402
                               run_main, save, table, workdir_homes)

EDGE_MS = 50  # fp-bps of the first and the last this many ms of the forward bins
UNSUPPORTED = {"dmfc_rsg": "its eval windows vary in length",
               "mc_rtt": "its latents are one random process, with no condition path to forecast from"}


def realistic_files(homes, name: str, unsupported: dict[str, str]):
    """``generate``'s ``(files, truth)`` of the realistic synthetic ``name`` in ``homes.data``,
    made again with its fluctuations kept; exits with one line where ``name`` is ``unsupported``
    (a reason by name) or there is no such data."""
    from nlbfab.splits import DATASETS
    from nlbfab.synth import generate
    from nlbfab.synth_nwb import existing_synthesis
    if name in unsupported:
        sys.exit(f"error: {name}: {unsupported[name]}: choose other --datasets")
    made = existing_synthesis(homes.data, DATASETS[name])
    if made is None or made[2] != "realistic":
        sys.exit(f"error: no realistic synthetic {name} in {homes.data}: run models.py with this --workdir first")
    return generate(DATASETS[name], made[0], made[1], made[2], keep_fluctuation=True)


def eval_window_starts(trials, dataset: str, bin_ms: int) -> tuple[np.ndarray, int]:
    """The first ms (in the file's latents) of each eval trial's window, and the window's length:
    nlb_tools aligns each window to the bin grid, which starts at the file's first ms."""
    from nlb_tools.make_tensors import PARAMS
    params = PARAMS[dataset]["eval_make_params"]
    field, (low, high) = params["align_field"], params["align_range"]
    align = trials.loc[trials["split"] == "val", "start" if field == "start_time" else field].to_numpy()
    return (np.ceil((align + low) / bin_ms) * bin_ms).astype(int), high - low


def binned(rates: np.ndarray, bin_ms: int) -> np.ndarray:
    """``(trials, ms, units)`` -> spikes per bin, ``(trials, ms / bin_ms, units)``."""
    return rates.reshape(rates.shape[0], -1, bin_ms, rates.shape[-1]).sum(2)


def reference_rates(session, truth, starts, window_ms: int, fp_ms: int, bin_ms: int, samples: int, rng):
    """Eval-trial rates (spikes per bin, held-in units first) of the window and the forward bins:
    the truth, the condition path and the forecast, each ``(window, forward)``."""
    order = np.concatenate([np.flatnonzero(~truth.heldout), np.flatnonzero(truth.heldout)])
    fluctuation = session.fluctuation
    added = fluctuation.latents()
    rates = lambda latents: truth.rates(np.asarray(latents, np.float64), order)  # noqa: E731
    true, condition, forecast = ([], []), ([], []), []
    for start in starts:
        span = slice(start, start + window_ms + fp_ms)
        latents, path = session.latents[span], session.latents[span] - added[span]
        for kept, x in ((true, latents), (condition, path)):
            kept[0].append(rates(x[:window_ms]))
            kept[1].append(rates(x[window_ms:]))
        futures = fluctuation.futures(start + window_ms, fp_ms, samples, rng)
        forecast.append(rates(path[window_ms:] + futures).mean(0))
    window = [binned(np.stack(x), bin_ms) for x in (true[0], condition[0])]
    forward = [binned(np.stack(x), bin_ms) for x in (true[1], condition[1], forecast)]
    return {"true": (window[0], forward[0]), "condition path": (window[1], forward[1]),
            "forecast": (window[0], forward[2])}


def with_eval(rates: dict, window: np.ndarray, forward: np.ndarray, heldin: int) -> dict:
    """``rates`` (a submission group's arrays) with the eval trials' window and forward rates replaced."""
    return rates | {"eval_rates_heldin": window[..., :heldin], "eval_rates_heldout": window[..., heldin:],
                    "eval_rates_heldin_forward": forward[..., :heldin], "eval_rates_heldout_forward": forward[..., heldin:]}


def row(name: str, data, rates: dict) -> dict:
    """The table's line for ``rates`` on ``data``'s split: EvalAI's co-bps, psth R2 and fp-bps, and
    fp-bps over the forward bins' first and last ``EDGE_MS``, where a forecast fades."""
    from nlbfab.evaluation import bits_per_spike, metrics
    scores = metrics(data, rates)
    forward = np.concatenate([rates["eval_rates_heldin_forward"], rates["eval_rates_heldout_forward"]], -1)
    spikes = np.concatenate([data.target["eval_spikes_heldin_forward"], data.target["eval_spikes_heldout_forward"]], -1)
    edge = EDGE_MS // data.split.bin_ms
    return {"split": data.split.name, "prediction": name, "co-bps": scores["co-bps"], "psth R2": scores.get("psth R2"),
            "fp-bps": scores["fp-bps"], f"fp first {EDGE_MS} ms": bits_per_spike(forward[:, :edge], spikes[:, :edge]),
            f"fp last {EDGE_MS} ms": bits_per_spike(forward[:, -edge:], spikes[:, -edge:])}


def forecast_rows(homes, datasets: list[str], bins: list[int], samples: int, seed: int) -> list[dict]:
    """``row``s of the oracle, the condition path, the forecast and every run under ``homes.runs``
    that predicts forward bins, per val split of ``datasets`` at ``bins``."""
    from nlb_tools.make_tensors import PARAMS

    from nlbfab.data import load_split
    from nlbfab.layout import submission_file
    from nlbfab.splits import get_split
    rows = []
    for name in datasets:
        files, truth = realistic_files(homes, name, UNSUPPORTED)
        for bin_ms in bins:
            split = get_split(f"{name}-{bin_ms:02d}ms-val")
            data = load_split(split, homes)
            with h5py.File(submission_file(homes.tag_dir("oracle"), "val"), "r") as h5:
                oracle = {key: value[()] for key, value in h5[split.group].items()}
            starts, window_ms = eval_window_starts(files["train"].trials, name, bin_ms)
            references = reference_rates(files["train"], truth, starts, window_ms, PARAMS[name]["fp_len"], bin_ms,
                                         samples, np.random.default_rng(seed))
            true_window = references.pop("true")[0]
            oracle_window = np.concatenate([oracle["eval_rates_heldin"], oracle["eval_rates_heldout"]], -1)
            mismatch = np.abs(true_window - oracle_window).max() / oracle_window.mean()
            if mismatch > 1e-3:
                sys.exit(f"error: the true rates of {split.name}'s eval windows differ from the oracle's "
                         f"(max {mismatch:.3g} of the mean rate): windows misplaced")
            first = len(rows)
            rows.append(row("oracle", data, oracle))
            for reference, (window, forward) in references.items():
                rows.append(row(reference, data, with_eval(oracle, window, forward, data.heldin)))
            for tag_dir in sorted(p for p in homes.runs.iterdir() if p.name != "oracle" and (p / split.name).is_dir()):
                with h5py.File(submission_file(tag_dir, "val"), "r") as h5:
                    rates = {key: value[()] for key, value in h5[split.group].items()}
                if "eval_rates_heldin_forward" in rates:  # smoothing predicts no forward bins
                    rows.append(row(tag_dir.name, data, rates))
            print(table(rows[first:], list(rows[first])), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    add_workdir_options(parser)
    parser.add_argument("--samples", type=positive_int, default=200, help="futures drawn per trial (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="of the futures' draws (default 0)")
    args = parser.parse_args()
    homes, datasets, bins = workdir_homes(args)
    rows = forecast_rows(homes, datasets, bins, args.samples, args.seed)
    print(f"device: {device_description()}\n" + table(rows, list(rows[0])))
    payload = {"device": device_description(), "args": vars(args) | {"workdir": str(args.workdir)}, "rows": rows}
    print(f"saved {save('forecast', payload)}")


if __name__ == "__main__":
    run_main(main)
