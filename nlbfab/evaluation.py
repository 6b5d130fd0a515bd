"""Predictions of a model on a split, and the NLB metrics of them, as EvalAI computes them.

``predict`` runs a model's ``apply`` over all train and eval trials; ``metrics`` hands the rates
and the split's official target to ``nlb_tools.evaluation.evaluate`` as in-memory dicts, so the
numbers are EvalAI's own (co-bps, fp-bps, vel R2 or tp corr, psth R2). Only its velocity
decoder is swapped, for the duration of the call, for ``nlbfab.ridge``'s: the same R2 to
rounding in a small fraction of the time (benchmarks/README.md). The final score of a
run (``nlbfab.scoring.score``) stays on unpatched nlb_tools.
"""
from __future__ import annotations

from contextlib import contextmanager

import nlb_tools.evaluation
import numpy as np
import torch
from nlb_tools.evaluation import evaluate

from nlbfab import ridge
from nlbfab.data import SplitData
from nlbfab.scoring import split_metrics


def inference_batch(device: torch.device) -> int:
    """Trials per forward pass without gradients. On a CPU, 128 keeps the GRUs' per-step
    tensors in cache (faster than 512: benchmarks/README.md); a GPU wants wide batches."""
    return 128 if device.type == "cpu" else 1024


@torch.no_grad()
def predict(forward, data: SplitData, inputs=None) -> dict[str, np.ndarray]:
    """Rates (spikes per bin, float32) in the submission's layout plus ``eval_latents`` and, given
    ``inputs``, ``eval_inputs``.

    ``forward(heldin) -> (logrates, latents)`` is the model in eval mode (no dropout);
    ``inputs(heldin) -> (trials, steps, inputs)``, where the model infers inputs, its inferred inputs."""
    batch_size = inference_batch(data.train_heldin.device)
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
            if inputs is not None:
                chunks = [inputs(chunk) for chunk in heldin.split(batch_size)]
                out["eval_inputs"] = torch.cat(chunks).float().cpu().numpy()
    return out


def co_bps(data: SplitData, eval_rates_heldout: np.ndarray) -> float:
    """Co-smoothing bits per spike on the eval trials (val phase): the metric runs are chosen by."""
    return bits_per_spike(eval_rates_heldout, data.target["eval_spikes_heldout"])


def bits_per_spike(rates: np.ndarray, spikes: np.ndarray) -> float:
    """nlb_tools' ``bits_per_spike`` (tests check it to 1e-9), fast enough to run every epoch.

    nlb_tools sums ``gammaln(spikes + 1)`` into both the model's and the null model's
    log-likelihood, where the two cancel, and tiles the null rates over every bin; here the
    null model's term is a sum per neuron. ``rates``, ``spikes: (trials, bins, neurons)``;
    NaN spikes (dmfc_rsg outside its window) are left out, zero rates read as 1e-9, as there."""
    spikes = spikes.astype(np.float64)
    rates = rates.astype(np.float64)
    observed = ~np.isnan(spikes)
    if not observed.all():
        rates, spikes = np.where(observed, rates, 1.0), np.where(observed, spikes, 0.0)
    rates[rates == 0] = 1e-9
    model = rates[observed].sum() - spikes.ravel() @ np.log(rates).ravel()
    per_neuron = spikes.sum(tuple(range(spikes.ndim - 1)))
    counts = observed.sum(tuple(range(spikes.ndim - 1)))
    null_rates = per_neuron / counts
    null_rates[null_rates == 0] = 1e-9
    null = np.sum(counts * null_rates - per_neuron * np.log(null_rates))
    return float((null - model) / per_neuron.sum() / np.log(2))


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
