"""The "oracle" prediction: the true rates of a synthetic dataset, aligned like its tensors.

The true rates are rebuilt from the latents saved beside the NWB files (``synthetic_truth.h5``)
and put in place of the spike counts of the loaded dataset; nlb_tools' own tensor makers then
cut them into trials. The oracle is therefore aligned exactly like the preprocessed split
(same trials, windows, jitter and bin sums), and scoring it gives the best achievable numbers.
"""
from __future__ import annotations

import copy
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from nlb_tools.make_tensors import make_train_input_tensors

from nlbfab.errors import UserError, first_line
from nlbfab.nwb import load_dataset
from nlbfab.splits import Split
from nlbfab.synth import Truth
from nlbfab.layout import TRUTH_FILE, dataset_dir

RATE_CHUNK_MS = 100_000  # rows of rates made at a time


def read_truth(path: Path) -> tuple[Truth, dict[str, dict[str, np.ndarray]]]:
    """The generating parameters and, per file (``train``/``test``), latents and trial starts."""
    if not path.is_file():
        raise UserError(f"no ground truth at {path}: only datasets made by 'bin/nlbfab-synth' have an oracle")
    try:
        with h5py.File(path, "r") as h5:
            truth = Truth(h5["loadings"][()], h5["bias"][()], h5["heldout"][()], h5["readout"][()],
                          int(h5.attrs["lag_ms"]), float(h5.attrs.get("ceiling_per_ms", np.inf)))
            files = {k: {"latents": h5[k]["latents"][()], "trial_start_ms": h5[k]["trial_start_ms"][()]}
                     for k in ("train", "test")}
    except (OSError, KeyError) as error:
        reason = first_line(error)
        raise UserError(f"cannot read {path} ({reason}): remake the dataset with 'bin/nlbfab-synth --force' and "
                        f"the --scale, --seed and --variability it was made with") from None
    return truth, files


def true_rate_dataset(folder: Path):
    """The dataset of ``folder`` at 1 ms, with its spike columns replaced by the true expected
    spikes per ms of every unit (held-out units included, also during the test file).

    The loaded spikes and behaviour are dropped before the rates are made, and the rates are
    made in chunks straight into the one array that the returned frame wraps: on full-size
    mc_maze every copy of that array is gigabytes."""
    truth, files = read_truth(Path(folder) / TRUTH_FILE)
    dataset = load_dataset(folder)
    clock_ms = np.round(dataset.data.index.total_seconds() * 1000).astype(np.int64)
    index, trials = dataset.data.index, dataset.trial_info
    columns = pd.MultiIndex.from_tuples(
        [(field, channel) for field in ("spikes", "heldout_spikes") for channel in dataset.data[field].columns],
        names=("signal_type", "channel"))
    dataset.data = None
    order = np.concatenate([np.flatnonzero(~truth.heldout), np.flatnonzero(truth.heldout)])
    rates = np.zeros((len(clock_ms), len(order)), np.float32)
    for which, content in files.items():
        in_file = trials["split"] == "test" if which == "test" else trials["split"] != "test"
        loaded_start = trials.loc[in_file, "start_time"].min().total_seconds() * 1000
        offset = int(round(loaded_start - content["trial_start_ms"].min()))
        local = clock_ms - offset
        rows = np.flatnonzero((local >= 0) & (local < len(content["latents"])))
        for chunk in np.array_split(rows, max(1, len(rows) // RATE_CHUNK_MS)):
            rates[chunk] = truth.rates(content["latents"][local[chunk]], order)
    dataset.data = pd.DataFrame(rates, index=index, columns=columns, copy=False)
    return dataset


def oracle_rates(data_home: Path, split: Split, rate_dataset=None) -> dict[str, np.ndarray]:
    """True rates (spikes per bin) for ``split`` in the submission's layout: ``train_rates_heldin``,
    ``train_rates_heldout``, ``eval_rates_heldin``, ``eval_rates_heldout`` and the ``*_forward``
    rates, each ``(trials, bins, neurons)``. Pass ``rate_dataset`` to reuse one load for many splits.
    """
    if rate_dataset is None:
        rate_dataset = true_rate_dataset(dataset_dir(data_home, split.dataset))
    # resample replaces binned.data with a new frame; its in-place nan_to_num finds no NaN in the
    # rates (made from zeros), so the shared 1 ms rates stay as they are without a copy
    binned = copy.copy(rate_dataset)
    binned.resample(split.bin_ms)
    name = split.dataset.name
    eval_mask = binned.trial_info["split"] == split.eval_split
    out = {}
    for prefix, trials in (("train", split.train_splits), ("eval", eval_mask)):
        # make_train_input_tensors cuts windows and forward bins, with dmfc_rsg's jitter drawn
        # from the same seed as the split's tensors, for any selection of trials
        cut = make_train_input_tensors(binned, name, trial_split=trials, save_file=False,
                                       include_forward_pred=True)
        for key, value in cut.items():
            out[key.replace("train_spikes", f"{prefix}_rates")] = value.astype(np.float32)
    return out
