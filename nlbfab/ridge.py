"""nlb_tools' velocity decoder, computed exactly in a small fraction of its time.

``nlb_tools.evaluation.fit_and_eval_decoder`` picks ridge's alpha with
``GridSearchCV(Ridge(), {"alpha": np.logspace(-4, 0, 9)})``: 5 folds x 9 alphas + 1 refit = 46
ridge fits, each a pass over (4/5 of) the ~60k x 182 train rows of mc_maze at 20 ms, most of an
evaluation hook's time. The fits differ only in which rows and which alpha they use, so here one
pass sums each fold's moments (x'x, x'y, sums), each training set's centred Gram matrix is the
total minus its fold's, and each alpha is one 182 x 182 solve. The result is sklearn's to
rounding (tests/test_ridge.py checks it against nlb_tools' own to 1e-9): KFold(5) without
shuffling, the mean R2 of the test folds per alpha, the first alpha of the best mean, refit on
all train rows with an unpenalised intercept, R2 (uniform average over outputs) on the eval rows.
"""
from __future__ import annotations

import numpy as np

ALPHAS = np.logspace(-4, 0, 9)  # nlb_tools' grid
FIXED_ALPHA = 1e-2  # nlb_tools' alpha without the grid search
FOLDS = 5  # GridSearchCV's default cv: KFold(5), no shuffling


def fit_and_eval_decoder(train_rates, train_behavior, eval_rates, eval_behavior, grid_search=True) -> float:
    """R2 on the eval rows of a ridge decoder fit on the train rows, as nlb_tools computes it.

    ``*_rates: (rows, neurons)``, ``*_behavior: (rows, outputs)``; rows whose behaviour is NaN
    (in its first column) are dropped, as nlb_tools does."""
    train_rates, train_behavior = _observed(train_rates, train_behavior)
    eval_rates, eval_behavior = _observed(eval_rates, eval_behavior)
    assert not np.any(np.isnan(train_rates)) and not np.any(np.isnan(eval_rates)), \
        "fit_and_eval_decoder: NaNs found in rate predictions within required trial times"
    # rates centred on all train rows keep the total-minus-fold Gram matrices free of cancellation;
    # behaviour stays as it is, so each fold's R2 sees the very numbers sklearn's does
    x_mean = train_rates.mean(0)
    x, y = train_rates - x_mean, train_behavior
    folds = _fold_slices(len(x))
    moments = [_moments(x[fold], y[fold]) for fold in folds]
    total = tuple(sum(parts) for parts in zip(*moments))
    alpha = _best_alpha(x, y, folds, moments, total) if grid_search else FIXED_ALPHA
    prediction = _predict(eval_rates - x_mean, _ridge(total, np.array([alpha])))[0]
    return float(_r2(eval_behavior, prediction))


def _observed(rates: np.ndarray, behavior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not np.any(np.isnan(behavior)):  # spares copying all rows
        return rates, behavior
    keep = ~np.isnan(behavior[:, 0])
    return rates[keep], behavior[keep]


def _fold_slices(rows: int) -> list[slice]:
    """KFold(5)'s test folds: contiguous, the first ``rows % 5`` one row longer."""
    sizes = np.full(FOLDS, rows // FOLDS)
    sizes[:rows % FOLDS] += 1
    ends = np.cumsum(sizes)
    return [slice(end - size, end) for end, size in zip(ends, sizes)]


def _moments(x: np.ndarray, y: np.ndarray) -> tuple:
    """``(rows, sum x, sum y, x'x, x'y)`` of a block of rows: ridge needs nothing else of them."""
    return len(x), x.sum(0), y.sum(0), x.T @ x, x.T @ y


def _ridge(moments: tuple, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge with an intercept fit on the rows of ``moments``, for each alpha: coefficients
    ``(alphas, features, outputs)`` and the rows' means of x and y (the intercept's part)."""
    rows, sum_x, sum_y, xx, xy = moments
    x_mean, y_mean = sum_x / rows, sum_y / rows
    # sklearn centres x and y before fitting, so alpha does not shrink the intercept
    gram = xx - rows * np.outer(x_mean, x_mean)
    cross = xy - rows * np.outer(x_mean, y_mean)
    coef = np.linalg.solve(gram + alphas[:, None, None] * np.eye(len(gram)), cross)
    return coef, x_mean, y_mean


def _predict(x: np.ndarray, fit: tuple) -> np.ndarray:
    """Each alpha's predictions for the rows of ``x: (rows, features)``: ``(alphas, rows, outputs)``."""
    coef, x_mean, y_mean = fit
    alphas, features, outputs = coef.shape
    # one matrix product for all alphas: a batched one reads x once per alpha
    flat = (x - x_mean) @ coef.transpose(1, 0, 2).reshape(features, alphas * outputs)
    return flat.reshape(len(x), alphas, outputs).transpose(1, 0, 2) + y_mean


def _best_alpha(x: np.ndarray, y: np.ndarray, folds: list[slice], moments: list[tuple], total: tuple) -> float:
    """GridSearchCV's choice: the highest mean R2 over test folds, the first alpha on ties.
    ``moments`` are each fold's, ``total`` their sum."""
    scores = []
    for fold, held_out in zip(folds, moments):
        train = tuple(t - h for t, h in zip(total, held_out))
        scores.append(_r2(y[fold], _predict(x[fold], _ridge(train, ALPHAS))))
    return float(ALPHAS[np.argmax(np.mean(scores, axis=0))])


def _r2(y: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """sklearn's ``r2_score`` averaged over outputs, over the leading axes of ``prediction``;
    an output that is constant scores 1 if predicted exactly, else 0 (its ``force_finite``)."""
    residual = np.sum((y - prediction) ** 2, axis=-2)
    total = np.sum((y - y.mean(0)) ** 2, axis=0)
    scores = np.where(total != 0, 1 - residual / np.where(total != 0, total, 1), residual == 0)
    return scores.mean(-1)
