"""Predictions of a model on a split, and the NLB metrics of them, as EvalAI computes them.

``predict`` runs a model's ``apply`` over all train and eval trials; ``metrics`` hands the rates
and the split's official target to ``nlb_tools.evaluation.evaluate`` as in-memory dicts, so the
numbers are EvalAI's own (co-bps, fp-bps, vel R2 or tp corr, psth R2). Only its velocity
decoder is swapped, for the duration of the call, for ``nlbfab.ridge``'s: the same R2 to
rounding in a fraction of a second instead of ~10 s per evaluation hook. The final score of a
run (``nlbfab.scoring.score``) stays on unpatched nlb_tools.
"""
from __future__ import annotations

from contextlib import contextmanager

import nlb_tools.evaluation
import numpy as np
import torch
from nlb_tools.evaluation import bits_per_spike, evaluate

from nlbfab import ridge
from nlbfab.data import SplitData
from nlbfab.scoring import split_metrics


@torch.no_grad()
def predict(forward, data: SplitData, batch_size: int = 512) -> dict[str, np.ndarray]:
    """Rates (spikes per bin, float32) in the submission's layout plus ``eval_latents``.

    ``forward(heldin) -> (logrates, latents)`` is the model in eval mode (no dropout)."""
    out = {}
    for prefix, heldin in (("train", data.train_heldin), ("eval", data.eval_heldin)):
        logrates, latents = zip(*(forward(chunk) for chunk in heldin.split(batch_size)))
        rates = torch.cat(logrates).float().exp().cpu().numpy()
        bins, n_in = data.bins, data.heldin
        out[f"{prefix}_rates_heldin"] = rates[:, :bins, :n_in]
        out[f"{prefix}_rates_heldout"] = rates[:, :bins, n_in:]
        out[f"{prefix}_rates_heldin_forward"] = rates[:, bins:, :n_in]
        out[f"{prefix}_rates_heldout_forward"] = rates[:, bins:, n_in:]
        if prefix == "eval":
            out["eval_latents"] = torch.cat(latents).float().cpu().numpy()
    return out


def co_bps(data: SplitData, eval_rates_heldout: np.ndarray) -> float:
    """Co-smoothing bits per spike on the eval trials (val phase): the metric runs are chosen by."""
    return float(bits_per_spike(eval_rates_heldout.astype(np.float64),
                                data.target["eval_spikes_heldout"].astype(np.float64)))


@contextmanager
def _fast_decoder():
    """nlb_tools' ``velocity_decoding`` looks its decoder up in its module at each call, so
    setting the module's name is enough; the original is back whatever happens."""
    original = nlb_tools.evaluation.fit_and_eval_decoder
    nlb_tools.evaluation.fit_and_eval_decoder = ridge.fit_and_eval_decoder
    try:
        yield
    finally:
        nlb_tools.evaluation.fit_and_eval_decoder = original


def metrics(data: SplitData, rates: dict[str, np.ndarray]) -> dict[str, float]:
    """All NLB metrics of ``rates`` for a val-phase split, via ``nlb_tools.evaluation.evaluate``
    with ``nlbfab.ridge``'s exact, fast velocity decoder."""
    group = data.split.group
    submission = {group: {k: v for k, v in rates.items() if k.startswith(("train_rates", "eval_rates"))}}
    with _fast_decoder():
        return split_metrics(evaluate({group: data.target}, submission), data.split)
