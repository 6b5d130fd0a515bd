"""The sequential autoencoder (SAE) of nlb-lightning, as two pure functions.

A bidirectional GRU encodes the held-in spikes; its final states give, through a linear layer,
the initial condition of an input-free GRU decoder unrolled over the observed and ``fwd_steps``
forward bins; a linear readout maps its states to the log-rates of all neurons. Dropout acts on
the input, the encoder's final states and the initial condition, as in nlb-lightning. The GRUs
are ``nlbfab.models.gru.gru``: PyTorch's GRU maths, with a faster backward on the CPU.
``apply_members`` runs an ensemble's members as one batched computation: the GRU kernel steps
every member's encoder directions, then every member's decoder, together.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nlbfab.models.dropout import spike_dropout
from nlbfab.models.gru import gru
from nlbfab.search_space import choice, loguniform, uniform
from nlbfab.train_config import Hyperparameter, Valid

HPARAMS = {"hidden_size": Hyperparameter(64, "Units in each GRU (encoder directions and decoder).", Valid(low=1))}
# nlbfab-search's default space (README: Hyperparameter search): ranges around the defaults above
# and TrainConfig's; learning rates stay above --min-lr's default 1e-3
SEARCH_SPACE = {
    "learning_rate": loguniform(2e-3, 2e-2),
    "weight_decay": loguniform(1e-6, 1e-2),
    "dropout": uniform(0.0, 0.6),
    "batch_size": choice(16, 32, 64),
    "hidden_size": choice(32, 64, 128),
}
GRU_WEIGHTS = ("w_ih", "w_hh", "b_ih", "b_hh")


def _uniform(generator, shape, bound):
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def _gru_params(prefix: str, inputs: int, hidden: int, generator) -> dict[str, torch.Tensor]:
    """PyTorch's default GRU initialisation: U(-1/sqrt(hidden), 1/sqrt(hidden))."""
    bound = 1 / math.sqrt(hidden)
    shapes = {"w_ih": (3 * hidden, inputs), "w_hh": (3 * hidden, hidden), "b_ih": (3 * hidden,), "b_hh": (3 * hidden,)}
    return {f"{prefix}_{name}": _uniform(generator, shape, bound) for name, shape in shapes.items()}


def init(sizes, seed: int, hidden_size: int) -> dict[str, torch.Tensor]:
    """Parameters for ``sizes`` (``nlbfab.models.Sizes``). The readout bias starts at the log of
    each neuron's mean count per bin, so the first steps fit structure, not the mean rate
    (at 5 ms, rates are small and a zero bias starts far off)."""
    g = torch.Generator().manual_seed(seed)
    hidden, neurons = hidden_size, sizes.heldin + sizes.heldout
    params = {}
    params |= _gru_params("enc_fwd", sizes.heldin, hidden, g)
    params |= _gru_params("enc_bwd", sizes.heldin, hidden, g)
    params |= _gru_params("dec", 1, hidden, g)
    params["ic_w"] = _uniform(g, (hidden, 2 * hidden), 1 / math.sqrt(2 * hidden))
    params["ic_b"] = torch.zeros(hidden)
    params["readout_w"] = _uniform(g, (neurons, hidden), 1 / math.sqrt(hidden))
    params["readout_b"] = torch.log(sizes.mean_counts.clamp_min(1e-4)).float()
    return params


def _gru(params, prefixes, inputs, h0, reverse):
    """The GRUs named by ``prefixes`` over ``inputs`` (see ``nlbfab.models.gru.gru``)."""
    weights = [{name: params[f"{prefix}_{name}"] for name in GRU_WEIGHTS} for prefix in prefixes]
    return gru(inputs, h0, weights, reverse)


def apply(params, heldin, fwd_steps: int, *, dropout: float = 0.0, training: bool = False):
    """``heldin: (trials, bins, heldin)`` -> ``(logrates, latents)``, both over
    ``bins + fwd_steps`` bins: ``(trials, bins + fwd, neurons)`` and ``(trials, bins + fwd, hidden)``."""
    trials, bins, _ = heldin.shape
    hidden = params["dec_w_hh"].shape[1]
    x = spike_dropout(heldin, dropout, training)
    h0 = x.new_zeros(2, trials, hidden)
    _, h_n = _gru(params, ("enc_fwd", "enc_bwd"), x, h0, reverse=(False, True))
    h = F.dropout(torch.cat([h_n[0], h_n[1]], -1), dropout, training)
    ic = F.dropout(F.linear(h, params["ic_w"], params["ic_b"]), dropout, training)
    no_input = x.new_zeros(trials, bins + fwd_steps, 1)
    latents, _ = _gru(params, ("dec",), no_input, ic.unsqueeze(0), reverse=(False,))
    return F.linear(latents[0], params["readout_w"], params["readout_b"]), latents[0]


def _stacked(members, name):
    return torch.stack([m[name] for m in members])


def apply_members(members, heldin, fwd_steps: int, *, dropout: float = 0.0, training: bool = False):
    """``apply`` for K members at once, each with its own weights (``members``: K parameter dicts)
    and its own dropout masks, on the same ``heldin: (trials, bins, heldin)``. Returns
    ``(logrates (K, trials, bins + fwd, neurons), latents (K, trials, bins + fwd, hidden))``,
    equal to stacking ``apply`` of each member (``tests/test_ensemble.py``)."""
    count, (trials, bins, _) = len(members), heldin.shape
    hidden = members[0]["dec_w_hh"].shape[1]
    x = spike_dropout(heldin.expand(count, *heldin.shape), dropout, training)  # (K, trials, bins, heldin)
    h0 = x.new_zeros(2 * count, trials, hidden)
    encoders = [{n: m[f"{p}_{n}"] for n in GRU_WEIGHTS} for m in members for p in ("enc_fwd", "enc_bwd")]
    _, h_n = gru(x.repeat_interleave(2, 0), h0, encoders, reverse=(False, True) * count)
    h = F.dropout(h_n.view(count, 2, trials, hidden).transpose(1, 2).reshape(count, trials, 2 * hidden),
                  dropout, training)
    ic = torch.baddbmm(_stacked(members, "ic_b")[:, None], h, _stacked(members, "ic_w").transpose(1, 2))
    ic = F.dropout(ic, dropout, training)
    no_input = x.new_zeros(trials, bins + fwd_steps, 1)
    decoders = [{n: m[f"dec_{n}"] for n in GRU_WEIGHTS} for m in members]
    latents, _ = gru(no_input, ic, decoders, reverse=(False,) * count)  # (K, trials, bins + fwd, hidden)
    logrates = torch.baddbmm(_stacked(members, "readout_b")[:, None], latents.flatten(1, 2),
                             _stacked(members, "readout_w").transpose(1, 2))
    return logrates.view(count, trials, bins + fwd_steps, -1), latents
