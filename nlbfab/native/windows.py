"""Which bins of which trials ``NWBDataset.make_trial_data`` cuts, without cutting them.

Its rules (nlb_tools 0.0.4), reproduced with the same pandas operations on the trial table:

- a window runs from ``align_field + align_range[0]`` to ``align_field + align_range[1] - 1 us``
  (``start_field`` / ``end_field - 1 us`` where a bound is None), and takes the rows whose time
  lies in it, both ends included: at bin width ``b`` the bins ``k`` with ``k * b`` inside;
- trials with a NaN in their start, end or alignment field are left out, and so is a trial whose
  window holds no bin (``groupby`` never sees it);
- without ``allow_overlap``, a window that reaches past the start of the next kept trial's window
  (or of the trial after that one in the whole table, whichever is first) ends 1 us before it;
- ``align_time``, by which PSTHs average trials, is a bin's time minus ``align_field`` rounded
  up to a whole bin.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Windows:
    """The windows of the trials ``make_trial_data`` keeps, in trial order: ``trial_id``,
    ``first`` (the first bin's index), ``bins`` (>= 1) and ``align`` (ns, ``align_field``
    rounded up to a bin), each ``(trials,)``."""

    trial_id: np.ndarray
    first: np.ndarray
    bins: np.ndarray
    align: np.ndarray

    def __getitem__(self, keep) -> "Windows":
        return Windows(self.trial_id[keep], self.first[keep], self.bins[keep], self.align[keep])

    def bin_index(self) -> np.ndarray:
        """``(sum(bins),)``: every window's bins, one after the other."""
        return np.repeat(self.first - np.r_[0, np.cumsum(self.bins)[:-1]], self.bins) + np.arange(self.bins.sum())


def trial_windows(trial_info: pd.DataFrame, ignored_trials, bin_ms: int, n_bins: int, start_field="start_time",
                  end_field="end_time", align_field=None, align_range=(None, None), allow_overlap=False) -> Windows:
    """``make_trial_data(ignored_trials=..., **make_params)``'s windows on a frame of ``n_bins``
    bins of ``bin_ms``. ``make_params``' ``allow_nans`` is the caller's (it drops rows, not bins)."""
    trial_info = trial_info.copy()
    trial_info["next_start"] = trial_info["start_time"].shift(-1)
    trial_info = trial_info.loc[~ignored_trials]
    bin_width = pd.to_timedelta(bin_ms, unit="ms")
    trial_start, trial_end = trial_info[start_field], trial_info[end_field]
    if align_field is not None:
        align_left = align_right = trial_info[align_field]
    else:
        align_left, align_right = trial_start, trial_end
    start_offset, end_offset = pd.to_timedelta(align_range, unit="ms")
    if not pd.isnull(start_offset) and not pd.isnull(end_offset) \
            and not ((end_offset - start_offset) / bin_width).is_integer():
        end_offset = start_offset + (end_offset - start_offset).round(bin_width)
    align_start = trial_start if pd.isnull(start_offset) else align_left + start_offset
    one_us = pd.to_timedelta(1, unit="us")
    align_end = trial_end - one_us if pd.isnull(end_offset) else align_right + end_offset - one_us
    align_data = pd.DataFrame({"trial_id": trial_info["trial_id"], "margin_start": align_start,
                               "margin_end": align_end, "align_start": align_start, "align_end": align_end,
                               "trial_start": trial_start, "align_left": align_left}).dropna()
    align_data["end_bound"] = pd.concat([trial_info["next_start"], align_start], axis=1).min(axis=1).shift(-1)
    endpoint = align_data["margin_end"]
    if not allow_overlap:
        overlap = align_data["end_bound"].notna() & (align_data["align_end"] > align_data["end_bound"])
        endpoint = endpoint.where(~overlap, align_data["end_bound"] - one_us)
    bin_ns = bin_ms * 1_000_000
    first = np.maximum(-(-align_data["margin_start"].to_numpy().astype(np.int64) // bin_ns), 0)
    last = np.minimum(endpoint.to_numpy().astype(np.int64) // bin_ns, n_bins - 1)
    align = -(-align_data["align_left"].to_numpy().astype(np.int64) // bin_ns) * bin_ns
    windows = Windows(align_data["trial_id"].to_numpy(), first, last - first + 1, align)
    return windows[windows.bins > 0]
