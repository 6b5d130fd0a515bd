"""NLB'21's spike-smoothing baseline (nlb_tools' ``examples/baselines/smoothing/run_smoothing.py``,
the leaderboard's "Smoothing"), as pure numpy/scikit-learn functions.

Held-in rates are the held-in spikes convolved with a Gaussian window; held-out rates come from a
Poisson regression of each held-out neuron on the log smoothed held-in spikes, fit on train
trials. Each dataset has the kernel width and regularisation that nlb_tools' authors chose by
5-fold cross-validation, and the window is theirs to the bin (its length and s.d. cut to whole
bins, zeros beyond a trial's ends), so a split's scores are the benchmark's baseline's.
"""
from __future__ import annotations

import numpy as np
from scipy import signal
from sklearn.linear_model import PoissonRegressor

LOG_EPS = 1e-4  # keeps log() finite for silent bins
MAX_ITER, MAX_ITER_LIMIT = 500, 10000  # a regression that has not converged is fit again with 5x the iterations

# (kernel s.d. in ms, the regression's alpha) by dataset: run_smoothing.py's cross-validated defaults
SETTINGS = {
    "mc_maze": (50, 0.01), "mc_rtt": (30, 0.1), "area2_bump": (30, 0.01), "dmfc_rsg": (60, 0.001),
    "mc_maze_large": (40, 0.1), "mc_maze_medium": (60, 0.1), "mc_maze_small": (60, 0.1),
}


def gaussian_window(kern_sd_ms: float, bin_ms: int) -> np.ndarray:
    """nlb_tools' smoothing window: ``int(6 sd / bin)`` points of a Gaussian whose s.d. is
    ``int(sd / bin)`` bins, summing to 1 (at 20 ms a 50 ms kernel is 15 points of s.d. 2 bins)."""
    window = signal.windows.gaussian(int(6 * kern_sd_ms / bin_ms), int(kern_sd_ms / bin_ms), sym=True)
    return window / window.sum()


def smooth_spikes(spikes: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Each trial's and neuron's spikes convolved with ``window`` along time, centred as
    ``np.convolve(..., 'same')`` centres it, with zeros beyond the trial's ends.
    ``spikes: (trials, bins, neurons)``; same shape out, float64."""
    return signal.convolve(spikes.astype(np.float64), window[None, :, None], mode="same")


def fit_poisson(train_in: np.ndarray, targets: np.ndarray, alpha: float) -> PoissonRegressor:
    """A Poisson regression of one neuron's ``targets: (samples,)`` on ``train_in: (samples,
    features)``, fit again with 5x the iterations while it stops at its limit (up to 10000)."""
    max_iter = MAX_ITER
    model = PoissonRegressor(alpha=alpha, max_iter=max_iter).fit(train_in, targets)
    while model.n_iter_ == max_iter and max_iter < MAX_ITER_LIMIT:
        max_iter *= 5
        model = PoissonRegressor(alpha=alpha, max_iter=max_iter).fit(train_in, targets)
    return model


def _flat(x: np.ndarray) -> np.ndarray:
    """(trials, bins, neurons) -> (trials * bins, neurons): regression samples are bins."""
    return x.reshape(-1, x.shape[-1])


def smoothing_rates(train_heldin: np.ndarray, train_heldout: np.ndarray, eval_heldin: np.ndarray,
                    bin_ms: int, kern_sd_ms: float, alpha: float) -> dict[str, np.ndarray]:
    """Rates in spikes per bin for the submission: ``train_rates_heldin``, ``train_rates_heldout``,
    ``eval_rates_heldin``, ``eval_rates_heldout``, each ``(trials, bins, neurons)``; a dataset's
    ``kern_sd_ms`` and ``alpha`` are in ``SETTINGS``."""
    window = gaussian_window(kern_sd_ms, bin_ms)
    train_smooth, eval_smooth = smooth_spikes(train_heldin, window), smooth_spikes(eval_heldin, window)
    train_in, eval_in = np.log(_flat(train_smooth) + LOG_EPS), np.log(_flat(eval_smooth) + LOG_EPS)
    targets = _flat(np.nan_to_num(train_heldout))
    train_out, eval_out = [], []
    for neuron in range(targets.shape[1]):
        model = fit_poisson(train_in, targets[:, neuron], alpha)
        train_out.append(model.predict(train_in))
        eval_out.append(model.predict(eval_in))
    train_rates_heldout = np.clip(np.stack(train_out, -1), 1e-9, 1e20)  # clipped as nlb_tools clips them
    eval_rates_heldout = np.clip(np.stack(eval_out, -1), 1e-9, 1e20)
    return {
        "train_rates_heldin": train_smooth.astype(np.float32),
        "train_rates_heldout": train_rates_heldout.reshape(*train_heldin.shape[:2], -1).astype(np.float32),
        "eval_rates_heldin": eval_smooth.astype(np.float32),
        "eval_rates_heldout": eval_rates_heldout.reshape(*eval_heldin.shape[:2], -1).astype(np.float32),
    }
