"""The values of a field in given bins, as ``NWBDataset.resample`` would have made them.

Every function takes windows (``Windows``: runs of consecutive bins) and returns their bins one
after the other, ``(sum(windows.bins), channels)``, computed from the rows each bin needs only.
The rules of ``resample`` (nlb_tools 0.0.4), bins being ``bin_ms`` rows from row 0, the last
one shorter where the recording ends:

- spike counts: a bin's sum, NaN rows counting 0; NaN where the bin's *first* row is NaN.
- other signals: each channel linearly interpolated over its NaN rows (pandas'
  ``interpolate(limit_direction="both")``: by position, constant beyond the first and last
  sample, in the column's dtype), then ``scipy.signal.decimate(q=bin_ms, n=500, ftype="fir")``,
  i.e. ``resample_poly`` with a 501-tap filter in the column's dtype: bin k is the filter centred
  on row k * q, the recording zero-padded at both ends. ``decimate`` runs here on each window
  with 250 rows of true signal on either side, laid out at the same phase, which gives its
  numbers bit for bit; rows beyond the recording are zeros, as there. NaN where the bin's first
  row was NaN before interpolation.
- (``resample`` takes mc_rtt's ``target_pos`` unfiltered, a bin its first row; no tensor holds
  its values, and where it is NaN follows the rule above.)
- PSTHs (``smoothed_counts``): nlbfab's ``smooth_spk`` (nlb_tools' ``smooth_column`` with
  ``ignore_nans=True``, float32) at 1 ms, then the spike-count rule above.
"""
from __future__ import annotations

import numpy as np
import scipy.signal as signal
from scipy.sparse import csr_array

from nlbfab.native.session import Intervals, SeriesField, SpikeField
from nlbfab.native.windows import Windows

FIR_HALF = 250  # decimate's n=500: the filter reaches 250 rows either side of a bin's first row
CHUNK_VALUES = 8_000_000  # float64 values of 1 ms smoothing held at once (64 MB)


def _ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """``concatenate([arange(a, b) for a, b in zip(starts, stops)])``, vectorized."""
    lengths = stops - starts
    return np.repeat(starts - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())


def spike_counts(field: SpikeField, windows: Windows, bin_ms: int) -> np.ndarray:
    """Spikes per bin, float32, NaN where the bin's first row is NaN."""
    offsets = np.r_[0, np.cumsum(windows.bins)[:-1]]
    bins = windows.bin_index()
    out = np.empty((len(bins), len(field.channels)), np.float32)
    for c, (rows, counts) in enumerate(zip(field.rows, field.counts)):
        spike_bins = rows // bin_ms
        lo, hi = np.searchsorted(spike_bins, windows.first), np.searchsorted(spike_bins, windows.first + windows.bins)
        found = _ranges(lo, hi)
        window = np.repeat(np.arange(len(lo)), hi - lo)
        out[:, c] = np.bincount(offsets[window] + spike_bins[found] - windows.first[window], weights=counts[found],
                                minlength=len(bins))
        out[~field.coverage[c].contains(bins * bin_ms), c] = np.nan
    return out


def resampled(field: SeriesField, windows: Windows, bin_ms: int, n_rows: int) -> np.ndarray:
    """A behaviour series per bin, in its dtype."""
    bins = windows.bin_index()
    out = np.empty((len(bins), len(field.channels)), field.dtype)
    before = -(-FIR_HALF // bin_ms) * bin_ms  # whole bins, so each window keeps decimate's phase
    starts = windows.first * bin_ms - before
    lengths = (windows.bins - 1) * bin_ms + before + FIR_HALF + 1
    lengths += -lengths % bin_ms
    rows = _ranges(starts, starts + lengths)
    inside = (rows >= 0) & (rows < n_rows)
    signal_rows = np.zeros((len(rows), len(field.channels)), field.dtype)
    for c, (known, values) in enumerate(zip(field.rows, field.values)):
        if len(known):
            signal_rows[inside, c] = np.interp(rows[inside], known, values)
    decimated = signal.decimate(signal_rows, bin_ms, axis=0, n=500, ftype="fir")
    segment_bin = (np.r_[0, np.cumsum(lengths)[:-1]] + before) // bin_ms
    out[:] = decimated[_ranges(segment_bin, segment_bin + windows.bins)]
    for c, coverage in enumerate(field.coverage):
        out[~coverage.contains(bins * bin_ms), c] = np.nan
    return out


def _kernel(kern_sd: float) -> np.ndarray:
    """``smooth_spk``'s Gaussian at 1 ms: ``int(6 * sd)`` taps (even: 'same' convolution then
    centres it half a row late), summing to 1."""
    window = signal.windows.gaussian(int(6 * kern_sd), kern_sd, sym=True)
    return window / np.sum(window)


def _smoothed_ms(rows: list[np.ndarray], counts: list[np.ndarray], coverage: Intervals, lo: np.ndarray,
                 hi: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Smoothed spikes of some channels sharing ``coverage`` in the rows ``[lo[w], hi[w])`` of
    each window, one window after the other, ``(sum(hi - lo), channels)`` float32, with 0 where
    the rows are NaN (what ``resample`` sums there).

    ``smooth_column(ignore_nans=True)`` convolves each run of non-NaN rows on its own ('same'
    mode: zeros beyond the run). Per piece of a window within one run, the spikes that reach it
    form a sparse matrix, times the kernel as a Toeplitz matrix."""
    size, centre = len(kernel), (len(kernel) - 1) // 2
    out = np.zeros(((hi - lo).sum(), len(rows)), np.float32)
    first_run = np.searchsorted(coverage.stops, lo, side="right")
    end_run = np.searchsorted(coverage.starts, hi, side="left")
    run = _ranges(first_run, np.maximum(end_run, first_run))
    if not len(run):
        return out
    window = np.repeat(np.arange(len(lo)), np.maximum(end_run - first_run, 0))
    start, stop = np.maximum(lo[window], coverage.starts[run]), np.minimum(hi[window], coverage.stops[run])
    reach_lo = np.maximum(coverage.starts[run], start + centre - size + 1)  # spikes a piece's rows see
    reach_hi = np.minimum(coverage.stops[run], stop + centre)
    length = stop - start
    most = length.max()
    lag = np.arange(most)[None, :] + size - 1 - np.arange(most + size - 1)[:, None]
    toeplitz = np.where((lag >= 0) & (lag < size), kernel[np.clip(lag, 0, size - 1)], 0.0)
    piece_rows, piece_cols, piece_counts = [], [], []
    for c, (spike_rows, spike_counts) in enumerate(zip(rows, counts)):
        a, b = np.searchsorted(spike_rows, reach_lo), np.searchsorted(spike_rows, reach_hi)
        found = _ranges(a, b)
        piece = np.repeat(np.arange(len(run)), b - a)
        piece_rows.append(piece * len(rows) + c)
        piece_cols.append(spike_rows[found] - (start[piece] + centre - size + 1))
        piece_counts.append(spike_counts[found])
    spikes = csr_array((np.concatenate(piece_counts), (np.concatenate(piece_rows), np.concatenate(piece_cols))),
                       shape=(len(run) * len(rows), most + size - 1))
    target = np.r_[0, np.cumsum(hi - lo)[:-1]][window] + start - lo[window]  # each piece's first output row
    step = max(1, CHUNK_VALUES // (len(rows) * most))
    for p0 in range(0, len(run), step):
        p1 = min(p0 + step, len(run))
        smoothed = (spikes[p0 * len(rows):p1 * len(rows)] @ toeplitz).reshape(p1 - p0, len(rows), most)
        piece = np.repeat(np.arange(p1 - p0), length[p0:p1])
        offset = _ranges(np.zeros(p1 - p0, np.int64), length[p0:p1])
        out[target[p0:p1][piece] + offset] = smoothed[piece, :, offset]
    return out


def smoothed_counts(field: SpikeField, windows: Windows, bin_ms: int, n_rows: int, kern_sd: float) -> np.ndarray:
    """Gaussian-smoothed spikes (s.d. ``kern_sd`` ms) per bin, float32, as ``_make_psth`` makes
    them: smoothed at 1 ms, then summed per bin like spike counts."""
    kernel = _kernel(kern_sd)
    lo = windows.first * bin_ms
    hi = np.minimum((windows.first + windows.bins) * bin_ms, n_rows)
    bins = windows.bin_index()
    bin_starts = np.repeat(np.r_[0, np.cumsum(hi - lo)[:-1]] - lo, windows.bins) + bins * bin_ms  # in ms rows
    out = np.empty((len(bins), len(field.channels)), np.float32)
    for coverage in dict.fromkeys(field.coverage):
        channels = [c for c, cov in enumerate(field.coverage) if cov == coverage]
        ms = _smoothed_ms([field.rows[c] for c in channels], [field.counts[c] for c in channels], coverage,
                          lo, hi, kernel)
        summed = np.add.reduceat(ms, bin_starts, axis=0)
        summed[~coverage.contains(bins * bin_ms)] = np.nan
        out[:, channels] = summed
    return out
