"""Baselines that write through the same submission path as a trained model: spike smoothing
(any dataset) and the oracle (the true rates of a synthetic dataset)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from nlbfab.oracle import oracle_rates, true_rate_dataset
from nlbfab.smoothing import smoothing_rates
from nlbfab.splits import Split
from nlbfab.synth_nwb import dataset_dir


def _smoothing(split: Split, prep_home: Path, file_names: dict[str, str]) -> dict[str, np.ndarray]:
    folder = Path(prep_home) / split.name
    with h5py.File(folder / file_names["train_input"], "r") as train, \
            h5py.File(folder / file_names["eval_input"], "r") as evaluation:
        return smoothing_rates(train["train_spikes_heldin"][()], train["train_spikes_heldout"][()],
                               evaluation["eval_spikes_heldin"][()], split.bin_ms)


def predict_baseline(method: str, splits: list[Split], data_home: Path, prep_home: Path,
                     file_names: dict[str, str]) -> Iterator[tuple[Split, dict[str, np.ndarray]]]:
    """``(split, rates)`` for each split; the oracle loads each dataset's truth once."""
    if method == "smoothing":
        for split in splits:
            yield split, _smoothing(split, prep_home, file_names)
        return
    for dataset in dict.fromkeys(s.dataset for s in splits):
        rate_dataset = true_rate_dataset(dataset_dir(data_home, dataset))
        for split in [s for s in splits if s.dataset == dataset]:
            yield split, oracle_rates(data_home, split, rate_dataset)
