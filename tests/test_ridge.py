"""The fast velocity decoder gives nlb_tools' own R2, and the evaluation hook's metrics with it are
those of unpatched nlb_tools."""
import nlb_tools.evaluation
import numpy as np
import pytest
from nlb_tools.evaluation import evaluate
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV

from nlbfab import ridge
from nlbfab.data import load_split
from tests.conftest import homes_with
from nlbfab.evaluation import metrics
from nlbfab.ridge import ALPHAS, fit_and_eval_decoder
from nlbfab.scoring import split_metrics
from nlbfab.smoothing import gaussian_window, smooth_spikes
from nlbfab.splits import get_split

ORIGINAL = nlb_tools.evaluation.fit_and_eval_decoder


def decoding_problem(seed: int, rows: int, neurons: int, eval_rows: int = 500):
    """Rates like a model's (positive, spikes per bin, drifting over the session) driven by
    latents that also drive a 2-d velocity; 5% of behaviour rows are NaN, as outside a trial's
    decoding window."""
    rng = np.random.default_rng(seed)
    latents = rng.normal(size=(rows + eval_rows, 4))
    drift = np.linspace(0, 1, rows + eval_rows)[:, None] * rng.normal(0, 0.5, neurons)
    rates = np.exp(latents @ rng.normal(0, 0.5, (4, neurons)) + rng.normal(-1, 0.5, neurons) + drift)
    behavior = latents[:, :2] @ rng.normal(size=(2, 2)) + 0.3 * rng.normal(size=(rows + eval_rows, 2))
    behavior[rng.random(rows + eval_rows) < 0.05] = np.nan
    return rates[:rows], behavior[:rows], rates[rows:], behavior[rows:]


# row counts not divisible by 5: KFold's first folds are one row longer
@pytest.mark.parametrize("seed, rows, neurons", [(0, 1403, 30), (1, 2221, 60), (2, 604, 12), (3, 3004, 45),
                                                  (4, 23, 8), (5, 37, 10), (6, 51, 6)])
@pytest.mark.parametrize("grid_search", [True, False])
def test_the_decoder_gives_nlb_tools_r2(seed, rows, neurons, grid_search):
    problem = decoding_problem(seed, rows, neurons)
    expected = ORIGINAL(*problem, grid_search=grid_search)
    assert np.isfinite(expected)
    assert fit_and_eval_decoder(*problem, grid_search=grid_search) == pytest.approx(expected, rel=0, abs=1e-9)


def small_problem(seed: int):
    """83 train rows (KFold test folds of 17, 17, 17, 16, 16), 200 eval rows of 40 small rates
    and a noisy linear 2-d behaviour: few rows for many neurons, so alpha matters."""
    rng = np.random.default_rng(seed)
    rates = rng.gamma(2.0, 0.02, size=(283, 40))
    behavior = rates @ rng.normal(size=(40, 2)) + 0.1 * rng.normal(size=(283, 2))
    return rng, rates, behavior


def test_the_decoder_picks_grid_search_alpha_inside_the_grid():
    _, rates, behavior = small_problem(1)
    train, evaluation = (rates[:83], behavior[:83]), (rates[83:], behavior[83:])
    best = GridSearchCV(Ridge(), {"alpha": ALPHAS}).fit(*train).best_params_["alpha"]
    assert ALPHAS[0] < best < ALPHAS[-1]
    r2 = fit_and_eval_decoder(*train, *evaluation)
    assert r2 == pytest.approx(ORIGINAL(*train, *evaluation), rel=0, abs=1e-9)
    # a neighbouring alpha would give another R2
    index = int(np.flatnonzero(ALPHAS == best)[0])
    for alpha in ALPHAS[index - 1], ALPHAS[index + 1]:
        assert abs(Ridge(alpha=alpha).fit(*train).score(*evaluation) - r2) > 1e-3


def test_the_decoder_takes_the_first_alpha_when_all_tie_as_kfold_splits_them():
    # behaviour constant within each of KFold(5)'s test folds: every alpha scores 0 on every
    # fold (sklearn's R2 of a constant), so GridSearchCV keeps its first alpha; folds cut one
    # row off would score otherwise
    rng, rates, behavior = small_problem(2)
    behavior[:83] = np.repeat(rng.integers(-3, 4, size=(5, 2)), [17, 17, 17, 16, 16], axis=0)
    train, evaluation = (rates[:83], behavior[:83]), (rates[83:], behavior[83:])
    assert GridSearchCV(Ridge(), {"alpha": ALPHAS}).fit(*train).best_params_["alpha"] == ALPHAS[0]
    r2 = fit_and_eval_decoder(*train, *evaluation)
    assert r2 == pytest.approx(ORIGINAL(*train, *evaluation), rel=0, abs=1e-9)
    assert abs(Ridge(alpha=ALPHAS[-1]).fit(*train).score(*evaluation) - r2) > 1e-3


def test_a_fold_of_constant_behaviour_scores_zero_as_in_sklearn():
    # not -inf, which would tie all alphas and keep the first
    _, rates, behavior = small_problem(1)
    behavior[:17] = 1.0
    train, evaluation = (rates[:83], behavior[:83]), (rates[83:], behavior[83:])
    assert GridSearchCV(Ridge(), {"alpha": ALPHAS}).fit(*train).best_params_["alpha"] != ALPHAS[0]
    r2 = fit_and_eval_decoder(*train, *evaluation)
    assert r2 == pytest.approx(ORIGINAL(*train, *evaluation), rel=0, abs=1e-9)
    assert abs(Ridge(alpha=ALPHAS[0]).fit(*train).score(*evaluation) - r2) > 1e-3


def smoothed_rates(data) -> dict[str, np.ndarray]:
    """Rates in the submission's layout from the smoothed reconstruction target: positive and
    related to behaviour, so every metric is a real number."""
    rates = {}
    for prefix, recon in (("train", data.train_recon), ("eval", data.eval_recon)):
        smooth = (smooth_spikes(recon.numpy(), gaussian_window(40, 20)) + 0.01).astype(np.float32)
        bins, heldin = data.bins, data.heldin
        rates[f"{prefix}_rates_heldin"] = smooth[:, :bins, :heldin]
        rates[f"{prefix}_rates_heldout"] = smooth[:, :bins, heldin:]
        rates[f"{prefix}_rates_heldin_forward"] = smooth[:, bins:, :heldin]
        rates[f"{prefix}_rates_heldout_forward"] = smooth[:, bins:, heldin:]
    return rates


# area2_bump decodes with two masks (two decoders); mc_maze with one over all trials
@pytest.mark.parametrize("name, decoders", [("mc_maze-20ms-val", 1), ("area2_bump-20ms-val", 2)])
def test_hook_metrics_are_those_of_unpatched_nlb_tools(prepared, monkeypatch, name, decoders):
    split = get_split(name)
    data = load_split(split, homes_with(prep=prepared))
    rates = smoothed_rates(data)
    expected = split_metrics(evaluate({split.group: data.target}, {split.group: rates}), split)
    assert {"co-bps", "vel R2", "psth R2", "fp-bps"} <= set(expected)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return fit_and_eval_decoder(*args, **kwargs)

    monkeypatch.setattr(ridge, "fit_and_eval_decoder", counted)
    assert metrics(data, rates) == pytest.approx(expected, rel=1e-9)
    assert len(calls) == decoders  # the fast decoder did the decoding
    assert nlb_tools.evaluation.fit_and_eval_decoder is ORIGINAL


def test_nlb_tools_decoder_is_restored_when_evaluation_fails(prepared):
    data = load_split(get_split("mc_maze-20ms-val"), homes_with(prep=prepared))
    rates = smoothed_rates(data)
    rates["train_rates_heldin"][0, 0, 0] = np.nan  # fails in the decoder, after co-bps
    with pytest.raises(AssertionError, match="NaNs found in rate predictions"):
        metrics(data, rates)
    assert nlb_tools.evaluation.fit_and_eval_decoder is ORIGINAL
