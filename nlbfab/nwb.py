"""Load an NLB dataset folder with nlb_tools, correctly and within memory on a modern stack.

Two fixes to ``nlb_tools`` 0.0.4, made by subclassing its ``NWBDataset`` (its code is unchanged):

- It joins a file's time series with ``pd.concat(axis=1)``, which since pandas 1.4 no longer
  sorts the union of their time indexes. Where behaviour is recorded only during trials, the
  loaded frame is then out of time order: a folder load cuts the second file at the wrong end
  (the last trial loses its data) and resampling fails. Each file's frame is sorted as it is read.
- Its PSTH step (``make_tensors._make_psth``) reads the NWB files a second time and smooths the
  whole 1 ms session in float64 in a process pool, holding several copies of it: more than
  24 GB for mc_maze. Inside ``reused_by_nlb_tools`` it gets a copy of the data already in memory,
  and smoothing fills one float32 array column by column (same PSTHs to float32 precision).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.signal as signal
from nlb_tools import make_tensors
from nlb_tools.nwb_interface import NWBDataset, smooth_column

from nlbfab.errors import UserError, first_line

_IN_MEMORY: dict[tuple[str, str], "TimeSortedNWBDataset"] = {}  # (folder, prefix) -> 1 ms dataset


class TimeSortedNWBDataset(NWBDataset):
    """``NWBDataset`` whose per-file data frames are sorted by time as they are loaded."""

    def __init__(self, fpath, prefix="", split_heldout=True, skip_fields=[]):  # noqa: B006 (nlb_tools' signature)
        held = _IN_MEMORY.get((os.path.expanduser(str(fpath)), prefix))
        if held is None:
            super().__init__(fpath, prefix, split_heldout, skip_fields)
            return
        fields = [f for f in held.data.columns.get_level_values(0).unique() if f not in skip_fields]
        self.fpath, self.prefix, self.bin_width = held.fpath, held.prefix, held.bin_width
        self.data = held.data[fields].copy()
        self.trial_info = held.trial_info.copy()
        self.descriptions = dict(held.descriptions)

    def load(self, fpath, split_heldout=True, skip_fields=[]):  # noqa: B006
        data, trial_info, descriptions, bin_width = super().load(fpath, split_heldout, skip_fields)
        return data.sort_index(), trial_info, descriptions, bin_width

    def smooth_spk(self, gauss_width, signal_type=None, name=None, overwrite=False, ignore_nans=False,
                   parallelized=False, dtype="float32"):
        """nlb_tools' Gaussian smoothing (its ``smooth_column``, column by column), written into
        one preallocated float32 array. Its own version smooths in float64 in a process pool and
        copies the session several times; its PSTH step calls this with ``overwrite=True`` on a
        frame of spikes only, the case done here. Other calls go to nlb_tools unchanged."""
        fields = signal_type or [f for f in ("spikes", "heldout_spikes") if f in self.data.columns]
        fields = sorted([fields] if isinstance(fields, str) else fields)
        if not overwrite or set(self.data.columns.get_level_values(0)) != set(fields):
            return super().smooth_spk(gauss_width, signal_type, name, overwrite, ignore_nans, parallelized, dtype)
        sd = gauss_width / self.bin_width
        window = signal.windows.gaussian(int(6 * sd), sd, sym=True)
        window /= np.sum(window)
        columns = pd.MultiIndex.from_tuples([(f, c) for f in fields for c in self.data[f].columns])
        smoothed = np.empty((len(self.data), len(columns)), dtype)
        for i, column in enumerate(columns):
            smoothed[:, i] = smooth_column((self.data[column].to_numpy(), window, ignore_nans, dtype))
        self.data = pd.DataFrame(smoothed, index=self.data.index, columns=columns, copy=False)


def load_dataset(folder: Path, hint: str = "") -> TimeSortedNWBDataset:
    """Both NWB files of one dataset folder, at 1 ms, time-sorted.

    ``hint`` (a command that makes the folder) is added to the error when it has no NWB files.
    """
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.glob("*.nwb")):
        raise UserError(f"no NWB files in {folder}" + (f": {hint}" if hint else ""))
    try:
        return TimeSortedNWBDataset(str(folder))
    except (OSError, KeyError, ValueError) as error:  # h5py and pynwb on a damaged or truncated file
        raise UserError(f"cannot read the NWB files in {folder} ({first_line(error)}): one is damaged; download "
                        f"it again (bin/nlbfab-download) or, if synthetic, remake it (bin/nlbfab-synth --force)") from None


@contextmanager
def reused_by_nlb_tools(dataset: TimeSortedNWBDataset):
    """Within this block, nlb_tools' tensor makers build datasets with ``TimeSortedNWBDataset``,
    and building one for ``dataset``'s folder copies ``dataset`` instead of reading its files.
    ``dataset`` must stay at 1 ms meanwhile (resample copies of it, not it)."""
    key = (dataset.fpath, dataset.prefix)
    _IN_MEMORY[key] = dataset
    previous, make_tensors.NWBDataset = make_tensors.NWBDataset, TimeSortedNWBDataset
    try:
        yield dataset
    finally:
        make_tensors.NWBDataset = previous
        _IN_MEMORY.pop(key, None)
