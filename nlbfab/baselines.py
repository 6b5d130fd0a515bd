"""Baselines that write through the same submission path as a trained model: spike smoothing
(any dataset) and the oracle (the true rates of a synthetic dataset)."""
from __future__ import annotations

from typing import Callable, Iterator

import h5py
import numpy as np

from nlbfab import layout
from nlbfab.errors import UserError
from nlbfab.layout import Homes
from nlbfab.oracle import oracle_rates, true_rate_dataset
from nlbfab.scoring import local_target, submit_and_score
from nlbfab.smoothing import SETTINGS, smoothing_rates
from nlbfab.splits import Split
from nlbfab.submission import expected_shapes


def _smoothing(split: Split, homes: Homes) -> dict[str, np.ndarray]:
    with h5py.File(homes.split_file(split, "train_input"), "r") as train, \
            h5py.File(homes.split_file(split, "eval_input"), "r") as evaluation:
        return smoothing_rates(train["train_spikes_heldin"][()], train["train_spikes_heldout"][()],
                               evaluation["eval_spikes_heldin"][()], split.bin_ms, *SETTINGS[split.dataset.name])


def predict_baseline(method: str, splits: list[Split], homes: Homes) -> Iterator[tuple[Split, dict[str, np.ndarray]]]:
    """``(split, rates)`` for each split; the oracle loads each dataset's truth once."""
    if method == "smoothing":
        for split in splits:
            yield split, _smoothing(split, homes)
        return
    for dataset in dict.fromkeys(s.dataset for s in splits):
        rate_dataset = true_rate_dataset(homes.dataset_dir(dataset))
        for split in [s for s in splits if s.dataset == dataset]:
            yield split, oracle_rates(homes.data, split, rate_dataset)


def run_baseline(method: str, splits: list[Split], homes: Homes, run_tag: str, report: Callable[[str], None]) -> None:
    """Write a baseline's rates for ``splits`` into ``RUNS_HOME/{run_tag}``'s submission files,
    scoring those that can be scored here (``local_target``); ``report`` gets a line per split
    and its metrics."""
    for split in splits:
        if not homes.split_dir(split).is_dir():
            raise UserError(f"{split.name} is not preprocessed: run 'bin/nlbfab-prep --split {split.name}'")
        if layout.config_file(homes.run_dir(run_tag, split)).is_file():  # its rates would replace the model's
            raise UserError(f"run '{run_tag}' holds a trained model of {split.name}: give the {method} rates "
                            f"another --run-tag")
    for split, rates in predict_baseline(method, splits, homes):
        result = submit_and_score(split, rates, homes.tag_dir(run_tag), expected_shapes(split, homes),
                                  local_target(homes, split, report))
        report(f"{split.name}: {method} rates written to {result['submission']} (group {split.group})")
        if "metrics" in result:
            report("  " + "  ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
