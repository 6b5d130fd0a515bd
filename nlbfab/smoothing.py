"""The spike-smoothing baseline of nlb_tools' examples, as pure numpy/scikit-learn functions.

Held-in rates are the Gaussian-smoothed held-in spikes; held-out rates come from a Poisson
regression of each held-out neuron on the log smoothed held-in spikes, fit on train trials.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d
from sklearn.linear_model import PoissonRegressor

LOG_EPS = 1e-4  # keeps log() finite for silent bins


def smooth_spikes(spikes: np.ndarray, kern_sd_bins: float) -> np.ndarray:
    """Gaussian-smoothed spikes along time. ``spikes: (trials, bins, neurons)``; same shape out."""
    return gaussian_filter1d(spikes.astype(np.float64), kern_sd_bins, axis=1, mode="nearest")


def _flat(x: np.ndarray) -> np.ndarray:
    """(trials, bins, neurons) -> (trials * bins, neurons): regression samples are bins."""
    return x.reshape(-1, x.shape[-1])


def smoothing_rates(train_heldin: np.ndarray, train_heldout: np.ndarray, eval_heldin: np.ndarray,
                    bin_ms: int, kern_sd_ms: float = 50.0, alpha: float = 0.01) -> dict[str, np.ndarray]:
    """Rates in spikes per bin for the submission: ``train_rates_heldin``, ``train_rates_heldout``,
    ``eval_rates_heldin``, ``eval_rates_heldout``, each ``(trials, bins, neurons)``."""
    sd = kern_sd_ms / bin_ms
    train_smooth, eval_smooth = smooth_spikes(train_heldin, sd), smooth_spikes(eval_heldin, sd)
    train_in, eval_in = np.log(_flat(train_smooth) + LOG_EPS), np.log(_flat(eval_smooth) + LOG_EPS)
    targets = _flat(np.nan_to_num(train_heldout))
    train_out, eval_out = [], []
    for neuron in range(targets.shape[1]):
        model = PoissonRegressor(alpha=alpha, max_iter=500).fit(train_in, targets[:, neuron])
        train_out.append(model.predict(train_in))
        eval_out.append(model.predict(eval_in))
    return {
        "train_rates_heldin": train_smooth.astype(np.float32),
        "train_rates_heldout": np.stack(train_out, -1).reshape(*train_heldin.shape[:2], -1).astype(np.float32),
        "eval_rates_heldin": eval_smooth.astype(np.float32),
        "eval_rates_heldout": np.stack(eval_out, -1).reshape(*eval_heldin.shape[:2], -1).astype(np.float32),
    }
