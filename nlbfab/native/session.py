"""One dataset folder's NWB files, read lazily and laid out in time as nlb_tools lays them out.

``nlb_tools.nwb_interface.NWBDataset`` loads a folder into one data frame with a row per ms of
the whole recording: a column per unit (spike counts, float16) and per behaviour channel,
NaN wherever nothing was recorded. A ``Session`` numbers time by the rows of that frame but
keeps only what the tensors are cut from:

- per unit, the rows that hold its spikes and how many (``SpikeField``);
- per behaviour channel, the rows of its samples, and their values for the series the tensors
  read (``SeriesField``);
- per channel, the rows where the frame would not be NaN, as ``Intervals``; and the rows where
  no column at all is NaN (``complete``), which ``make_trial_data`` keeps when it drops NaNs.

The frame's rules, from ``NWBDataset.__init__`` and ``load`` (nlb_tools 0.0.4), followed here:

- files: ``sorted(glob("*.nwb"))`` of the folder (the test file before the train file). Each
  is a grid of ``round(max last obs_intervals stop * 1000)`` rows from t = 0; the second file
  is shifted to start at ``ceil((last row of the first, in s, + 0.05) * 10) * 100`` ms, and so
  on, with NaN rows between them. Trial ``*_time`` fields shift with their file, trial ids are
  numbered on across files.
- spikes: a spike at t s falls in row ``int(round(t * 1000, 6))`` (truncated towards zero;
  numpy's negative indexing for a negative row); a field ('spikes' for held-in units,
  'heldout_spikes' for held-out ones) is NaN outside the ``obs_intervals`` of its *first*
  unit (rows ``ceil(start * 1000)`` to ``floor(stop * 1000)``, stop excluded), and in a file
  without such units.
- behaviour: every TimeSeries of the file, of a processing module, or inside a container
  (named ``container_series``), with channel names from ``comments="columns=[x,y]"``; a series
  with a timestamp off the file's 1 ms grid is dropped. Samples are placed on their row and
  sorted by time (``nlbfab.nwb.TimeSortedNWBDataset``'s fix, what nlbfab's nlb_tools engine
  loads); a sample whose time is not a whole ms in nanoseconds vanishes when the files are
  stacked (the frame is reindexed to whole ms).
- channels of a field are sorted by name, the union over the files (``make_trial_data`` sorts
  its columns).

Files are opened with pynwb, which maps their structure (trials table, units table, the
TimeSeries among the containers) as nlb_tools sees it, without reading any array; the arrays are
read through the h5py datasets it hands out, a unit or a block of samples at a time.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pynwb import NWBHDF5IO, ProcessingModule, TimeSeries
from pynwb.core import MultiContainerInterface

from nlbfab.errors import UserError, first_line

logger = logging.getLogger(__name__)
SPIKE_FIELDS = ("spikes", "heldout_spikes")
MS = 1_000_000  # ns
CHUNK_SAMPLES = 1 << 18  # samples of a behaviour series read at once


@dataclass(frozen=True)
class Intervals:
    """Sorted, disjoint, non-adjacent runs ``[starts[i], stops[i])`` of 1 ms rows."""

    starts: np.ndarray
    stops: np.ndarray

    @classmethod
    def union(cls, starts, stops) -> "Intervals":
        """The rows in any of the runs ``[starts[i], stops[i])`` (in any order, overlapping or not)."""
        starts, stops = np.asarray(starts, np.int64), np.asarray(stops, np.int64)
        order = np.argsort(starts, kind="stable")
        starts, stops = starts[order], stops[order]
        starts, stops = starts[stops > starts], stops[stops > starts]
        if not len(starts):
            return cls(starts, stops)
        reach = np.maximum.accumulate(stops)
        new = np.r_[True, starts[1:] > reach[:-1]]
        last = np.r_[np.flatnonzero(new)[1:] - 1, len(starts) - 1]
        return cls(starts[new], reach[last])

    @classmethod
    def of_rows(cls, rows: np.ndarray) -> "Intervals":
        """The runs of consecutive rows in ``rows`` (sorted, unique)."""
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        return cls(rows[np.r_[0, breaks]], rows[np.r_[breaks - 1, len(rows) - 1]] + 1) if len(rows) \
            else cls(rows.astype(np.int64), rows.astype(np.int64))

    def contains(self, rows: np.ndarray) -> np.ndarray:
        if not len(self.starts):
            return np.zeros(np.shape(rows), bool)
        run = np.searchsorted(self.starts, rows, side="right") - 1
        return (run >= 0) & (rows < self.stops[np.maximum(run, 0)])

    def __and__(self, other: "Intervals") -> "Intervals":
        edges = np.unique(np.concatenate([self.starts, self.stops, other.starts, other.stops]))
        inside = self.contains(edges[:-1]) & other.contains(edges[:-1])
        return Intervals.union(edges[:-1][inside], edges[1:][inside])

    def __eq__(self, other) -> bool:
        return np.array_equal(self.starts, other.starts) and np.array_equal(self.stops, other.stops)

    def __hash__(self) -> int:
        return hash((self.starts.tobytes(), self.stops.tobytes()))


@dataclass
class SpikeField:
    """Held-in or held-out units: per channel (unit id, sorted), its spikes' rows and counts, and
    the rows where its column of the frame is not NaN."""

    channels: list
    rows: list[np.ndarray]
    counts: list[np.ndarray]
    coverage: list[Intervals]


@dataclass
class SeriesField:
    """A behaviour TimeSeries: per channel (sorted by name) the rows of its non-NaN samples as
    ``coverage``, and for a series whose values are kept, those rows and values (``rows``,
    ``values``; else None). ``dtype``: the frame's dtype for it (float32 if stored so)."""

    channels: list
    coverage: list[Intervals]
    dtype: np.dtype
    rows: list[np.ndarray] | None
    values: list[np.ndarray] | None


@dataclass
class Session:
    """A dataset folder as nlb_tools' ``NWBDataset`` sees it, without its 1 ms frame.

    ``trial_info`` is ``NWBDataset.trial_info`` (the same frame); ``n_rows`` the frame's number
    of 1 ms rows; ``fields`` by name: 'spikes', 'heldout_spikes' and each behaviour series;
    ``complete`` the rows without a NaN in any column."""

    trial_info: pd.DataFrame
    n_rows: int
    fields: dict[str, SpikeField | SeriesField]
    complete: Intervals


@dataclass
class _File:
    trial_info: pd.DataFrame
    n_rows: int
    fields: dict[str, SpikeField | SeriesField]


def _timeseries(nwbfile) -> dict:
    """``NWBDataset.load``'s ``find_timeseries``: the TimeSeries by the name nlb_tools gives them."""
    found = {}

    def visit(parent):
        for child in parent.children:
            if isinstance(child, TimeSeries):
                found[child.name] = child
            elif isinstance(child, ProcessingModule):
                visit(child)
            elif isinstance(child, MultiContainerInterface):
                for series in child.children:
                    if isinstance(series, TimeSeries):
                        found[f"{child.name}_{series.name}"] = series
    visit(nwbfile)
    return found


def _unit_rows(times: np.ndarray, n_rows: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A unit's spike times (s) -> (rows, counts) as ``NWBDataset.load`` bins them into its
    float16 array ``spike_arr[rows] = counts``: a negative row counts from the end (numpy
    indexing), and where one then meets a row already there, the later assignment wins."""
    rows, counts = np.unique((np.asarray(times, np.float64) * 1000.0).round(6).astype(int), return_counts=True)
    if len(rows) and (rows[0] < -n_rows or rows[-1] >= n_rows):
        raise UserError(f"{path}: a spike lies outside the recording (its obs_intervals): nlb_tools cannot load "
                        f"this file either")
    rows = np.where(rows < 0, rows + n_rows, rows)
    order = np.argsort(rows, kind="stable")
    rows, counts = rows[order], counts[order]
    last = np.r_[rows[1:] != rows[:-1], True] if len(rows) else np.zeros(0, bool)  # a unit without spikes
    return rows[last], counts[last].astype(np.float32)


def _observed(obs_intervals, n_rows: int) -> Intervals:
    """The rows ``NWBDataset.load``'s ``make_mask`` leaves valid: ``mask[ceil(start * 1000):
    floor(stop * 1000)] = False`` per interval, with Python's slice rules."""
    ranges = [range(n_rows)[int(np.ceil(round(start * 1000.0, 6))):int(np.floor(round(stop * 1000.0, 6)))]
              for start, stop in obs_intervals]
    return Intervals.union([r.start for r in ranges], [r.stop for r in ranges])


def _series(name: str, ts, n_rows: int, keep_values: bool) -> SeriesField | None:
    """One TimeSeries of a file, read ``CHUNK_SAMPLES`` samples at a time, or None where
    ``NWBDataset.load`` drops it (a timestamp off the file's 1 ms grid)."""
    seconds = ts.timestamps[()] if ts.timestamps is not None \
        else np.arange(ts.data.shape[0]) / ts.rate + ts.starting_time
    index = pd.to_timedelta(seconds, unit="s")
    rounded = np.round(index.total_seconds().to_numpy(), 6)
    grid_row = np.rint(rounded * 1000)
    if not np.all((grid_row >= 0) & (grid_row < n_rows) & (np.round(grid_row / 1000, 6) == rounded)):
        logger.warning(f"Dropping {name} due to timestamp mismatch.")
        return None
    n_channels = int(np.prod(ts.data.shape[1:]))
    channels = ts.comments.split("[")[-1].split("]")[0].split(",") if "columns=" in ts.comments \
        else [f"{i:04d}" for i in range(n_channels)]
    ns = index.asi8
    no_rows = np.empty(0, np.int64)
    runs = [[Intervals(no_rows, no_rows)] for _ in channels]
    kept = [[(no_rows, np.empty(0, ts.data.dtype))] for _ in channels]
    for lo in range(0, len(ns), CHUNK_SAMPLES):
        on_grid = ns[lo:lo + CHUNK_SAMPLES] % MS == 0
        rows = ns[lo:lo + CHUNK_SAMPLES][on_grid] // MS
        values = ts.data[lo:lo + CHUNK_SAMPLES].reshape(-1, n_channels)[on_grid]
        order = np.argsort(rows, kind="stable")
        rows, values = rows[order], values[order]
        for c in range(n_channels):
            valid = ~pd.isna(values[:, c])
            runs[c].append(Intervals.of_rows(rows[valid]))
            if keep_values:
                kept[c].append((rows[valid], values[valid, c]))
    coverage = [Intervals.union(np.concatenate([r.starts for r in found]), np.concatenate([r.stops for r in found]))
                for found in runs]
    by_name = np.argsort(channels, kind="stable")
    names, coverage = [channels[c] for c in by_name], [coverage[c] for c in by_name]
    if not keep_values:
        return SeriesField(names, coverage, ts.data.dtype, None, None)
    rows = [np.concatenate([r for r, _ in kept[c]]) for c in by_name]
    values = [np.concatenate([v for _, v in kept[c]]) for c in by_name]
    by_time = [np.argsort(r, kind="stable") for r in rows]
    return SeriesField(names, coverage, ts.data.dtype, [r[o] for r, o in zip(rows, by_time)],
                       [v[o] for v, o in zip(values, by_time)])


def _read_file(path: Path, keep_values: set[str]) -> _File:
    """One NWB file as ``NWBDataset.load`` reads it (its rows start at 0)."""
    with NWBHDF5IO(str(path), "r") as io:
        nwbfile = io.read()
        trial_info = (nwbfile.trials.to_dataframe().reset_index()
                      .rename({"id": "trial_id", "stop_time": "end_time"}, axis=1))
        units = nwbfile.units.to_dataframe(exclude={"spike_times"})
        if "obs_intervals" not in units:
            raise UserError(f"{path}: its units have no obs_intervals, which nlb_tools needs for the recording's end")
        n_rows = round(max(units.obs_intervals.apply(lambda x: x[-1][-1])) * 1000.0)
        # nlb_tools compares the end in ms with the last trial's end in s, so this rarely applies
        if n_rows < trial_info["end_time"].iloc[-1]:
            n_rows = round(trial_info["end_time"].iloc[-1] * 1000.0)
        fields: dict[str, SpikeField | SeriesField] = {}
        for name, ts in _timeseries(nwbfile).items():
            if "spikes" in name:
                raise UserError(f"{path}: a TimeSeries named '{name}' would be binned as spike counts by nlb_tools; "
                                f"the native engine does not support it: use --engine nlb_tools")
            series = _series(name, ts, n_rows, name in keep_values)
            if series is not None:
                fields[name] = series
        spike_times = nwbfile.units["spike_times"]
        ends = spike_times.data[()]
        for name, mask in zip(SPIKE_FIELDS, ((~units.heldout).to_numpy(), units.heldout.to_numpy())):
            if not np.any(mask):
                continue
            observed = _observed(units[mask].iloc[0].obs_intervals, n_rows)
            positions = np.flatnonzero(mask)
            order = np.argsort(units.index[positions], kind="stable")
            rows, counts = [], []
            for position in positions[order]:
                start = ends[position - 1] if position else 0
                unit_rows, unit_counts = _unit_rows(spike_times.target.data[start:ends[position]], n_rows, path)
                seen = observed.contains(unit_rows)  # NWBDataset writes NaN over spikes outside
                rows.append(unit_rows[seen])
                counts.append(unit_counts[seen])
            fields[name] = SpikeField(list(units.index[positions[order]]), rows, counts, [observed] * len(rows))
    trial_info = trial_info.apply(lambda x: pd.to_timedelta(x, unit="s") if x.name.endswith("_time") else x, axis=0)
    return _File(trial_info, n_rows, fields)


def _merged(name: str, parts: list[tuple[int, SpikeField | SeriesField]]) -> SpikeField | SeriesField:
    """A field over all files: ``parts`` are (first row of the file, its field there)."""
    channels = sorted({c for _, f in parts for c in f.channels})
    per_channel = [[(offset, f, f.channels.index(c)) for offset, f in parts if c in f.channels] for c in channels]
    coverage = [Intervals.union(np.concatenate([f.coverage[i].starts + o for o, f, i in found]),
                                np.concatenate([f.coverage[i].stops + o for o, f, i in found]))
                for found in per_channel]
    if name in SPIKE_FIELDS:
        return SpikeField(channels, [np.concatenate([f.rows[i] + o for o, f, i in found]) for found in per_channel],
                          [np.concatenate([f.counts[i] for o, f, i in found]) for found in per_channel], coverage)
    dtype = np.result_type(*[f.dtype for _, f in parts])
    if parts[0][1].rows is None:
        return SeriesField(channels, coverage, dtype, None, None)
    return SeriesField(channels, coverage, dtype,
                       [np.concatenate([f.rows[i] + o for o, f, i in found]) for found in per_channel],
                       [np.concatenate([f.values[i] for o, f, i in found]).astype(dtype) for found in per_channel])


def nwb_files(folder: Path) -> list[str]:
    """The files ``NWBDataset(folder)`` loads, in its order (hidden files excluded, as glob does)."""
    return sorted(glob.glob(os.path.join(str(folder), "*.nwb")))


def _readable_file(path: Path, keep_values: set[str]) -> _File:
    """``_read_file``, or one line naming a file that is not a readable NWB file."""
    try:
        return _read_file(path, keep_values)
    except (OSError, KeyError, ValueError) as error:  # h5py and pynwb on a damaged or truncated file
        reason = first_line(error)
        raise UserError(f"cannot read {path} ({reason}): it is damaged; download it again (bin/nlbfab-download) "
                        f"or, if synthetic, remake it (bin/nlbfab-synth --force)") from None


def open_session(folder: Path, keep_values: tuple[str, ...] = (), paths: list[Path] | None = None) -> Session:
    """The folder's NWB files as one ``Session``; the values of the series named in
    ``keep_values`` are kept (the others only say where they are NaN). ``paths``: these files
    instead, as if they lay in one folder (laid out in the order of their names)."""
    found = sorted(paths, key=lambda p: Path(p).name) if paths is not None else nwb_files(folder)
    files = [_readable_file(Path(p), set(keep_values)) for p in found]
    if not files:
        raise UserError(f"no NWB files in {folder}")
    offsets, trial_infos, trials = [0], [files[0].trial_info], len(files[0].trial_info)
    for previous, file in zip(files, files[1:]):
        past_end = pd.Timedelta(offsets[-1] + previous.n_rows - 1, unit="ms").total_seconds() + round(50 / 1000, 4)
        shift_ms = np.ceil(past_end * 10) * 100  # a whole number of ms, as a float
        offsets.append(int(shift_ms))
        trial_infos.append(file.trial_info.apply(
            lambda x: x + pd.to_timedelta(shift_ms, unit="ms") if x.name.endswith("_time")
            else x + trials if x.name == "trial_id" else x))
        trials += len(file.trial_info)
    trial_info = pd.concat(trial_infos, axis=0, join="outer").reset_index(drop=True) if len(files) > 1 \
        else trial_infos[0]
    names = list(dict.fromkeys(n for f in files for n in f.fields))
    fields = {n: _merged(n, [(o, f.fields[n]) for o, f in zip(offsets, files) if n in f.fields]) for n in names}
    n_rows = offsets[-1] + files[-1].n_rows
    complete = Intervals(np.array([0]), np.array([n_rows]))
    for coverage in {c for f in fields.values() for c in f.coverage}:
        complete = complete & coverage
    return Session(trial_info, n_rows, fields, complete)
