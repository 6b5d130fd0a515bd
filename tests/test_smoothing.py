"""The smoothing baseline is NLB'21's: nlb_tools' run_smoothing.py, step for step, with each
dataset's cross-validated kernel and regularisation."""
import numpy as np
import pytest
from scipy import signal
from sklearn.linear_model import PoissonRegressor

from nlbfab.smoothing import SETTINGS, gaussian_window, smooth_spikes, smoothing_rates
from nlbfab.splits import DATASETS


def run_smoothing(train_heldin, train_heldout, eval_heldin, bin_ms, kern_sd, alpha):
    """run_smoothing.py's steps as it writes them: its window, np.convolve 'same' along each
    trial and neuron, the log offset, one PoissonRegressor a held-out neuron, the clip."""
    window = signal.windows.gaussian(int(6 * kern_sd / bin_ms), int(kern_sd / bin_ms), sym=True)
    window /= np.sum(window)
    smooth = [np.apply_along_axis(lambda x: np.convolve(x, window, "same"), 1, s) for s in (train_heldin, eval_heldin)]
    logs = [np.log(s.reshape(-1, s.shape[2]) + 1e-4) for s in smooth]
    targets = train_heldout.reshape(-1, train_heldout.shape[2])
    models = [PoissonRegressor(alpha=alpha, max_iter=500).fit(logs[0], targets[:, c]) for c in range(targets.shape[1])]
    heldout = [np.clip(np.vstack([m.predict(x) for m in models]).T, 1e-9, 1e20) for x in logs]
    return {"train_rates_heldin": smooth[0], "eval_rates_heldin": smooth[1],
            "train_rates_heldout": heldout[0].reshape(train_heldin.shape[:2] + (-1,)),
            "eval_rates_heldout": heldout[1].reshape(eval_heldin.shape[:2] + (-1,))}


@pytest.mark.parametrize("dataset, bin_ms", [("mc_maze", 20), ("mc_maze_small", 5), ("mc_rtt", 20)])
def test_smoothing_is_nlb_tools_baseline(dataset, bin_ms):
    rng = np.random.default_rng(0)
    bins = 700 // bin_ms
    drive = np.sin(np.linspace(0, 3, bins))[None, :, None] * rng.normal(1, 0.3, (1, 1, 14))
    spikes = rng.poisson(np.exp(drive + rng.normal(0, 0.3, (30, 1, 14))) * bin_ms / 50).astype(float)
    train_heldin, train_heldout, eval_heldin = spikes[:20, :, :10], spikes[:20, :, 10:], spikes[20:, :, :10]
    ours = smoothing_rates(train_heldin, train_heldout, eval_heldin, bin_ms, *SETTINGS[dataset])
    theirs = run_smoothing(train_heldin, train_heldout, eval_heldin, bin_ms, *SETTINGS[dataset])
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-6)


def test_every_dataset_has_the_baselines_settings():
    assert set(SETTINGS) == set(DATASETS)
    assert SETTINGS["mc_maze_small"] == (60, 0.1) and SETTINGS["dmfc_rsg"] == (60, 0.001)


def test_the_window_is_cut_to_whole_bins_and_zero_beyond_the_trial():
    window = gaussian_window(50, 20)
    assert len(window) == 15 and window.sum() == pytest.approx(1)
    assert window[7] / window[5] == pytest.approx(np.exp(2 ** 2 / (2 * 2 ** 2)))  # s.d. 2 bins, not 2.5
    ones = smooth_spikes(np.ones((1, 30, 1)), window)[0, :, 0]
    assert ones[15] == pytest.approx(1) and ones[0] == pytest.approx(window[7:].sum())
