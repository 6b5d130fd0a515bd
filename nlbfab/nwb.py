"""Load an NLB dataset folder with nlb_tools, correctly on a modern pandas.

``nlb_tools`` 0.0.4 joins a file's time series with ``pd.concat(axis=1)``, which since pandas
1.4 no longer sorts the union of their time indexes. Where behaviour is recorded only during
trials, the loaded frame is then out of time order: a folder load cuts the second file at the
wrong end (the last trial loses its data) and resampling fails. Sorting each file's frame right
after it is read restores what nlb_tools was written against, for real and synthetic files alike.
"""
from __future__ import annotations

from pathlib import Path

from nlb_tools.nwb_interface import NWBDataset

from nlbfab.errors import UserError


class TimeSortedNWBDataset(NWBDataset):
    """``NWBDataset`` whose per-file data frames are sorted by time as they are loaded."""

    def load(self, fpath, split_heldout=True, skip_fields=[]):  # noqa: B006 (nlb_tools' signature)
        data, trial_info, descriptions, bin_width = super().load(fpath, split_heldout, skip_fields)
        return data.sort_index(), trial_info, descriptions, bin_width


def load_dataset(folder: Path, hint: str = "") -> TimeSortedNWBDataset:
    """Both NWB files of one dataset folder, at 1 ms, time-sorted.

    ``hint`` (a command that makes the folder) is added to the error when it has no NWB files.
    """
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.glob("*.nwb")):
        raise UserError(f"no NWB files in {folder}" + (f": {hint}" if hint else ""))
    return TimeSortedNWBDataset(str(folder))
