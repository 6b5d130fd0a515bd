"""A second, deliberately different model: a causal GRU over the held-in spikes read out to all
neurons, extrapolated over the forward bins with its last state held. It shows the ``init`` /
``apply`` contract serving any model, and is a quick baseline."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nlbfab.models.dropout import spike_dropout
from nlbfab.models.sae import SEARCH_SPACE, _gru, _gru_params, _uniform  # noqa: F401 (the SAE's space is this model's)
from nlbfab.train_config import Hyperparameter, Valid

HPARAMS = {"hidden_size": Hyperparameter(64, "Units in the GRU.", Valid(low=1))}


def init(sizes, seed: int, hidden_size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = _gru_params("rnn", sizes.heldin, hidden_size, g)
    params["readout_w"] = _uniform(g, (sizes.heldin + sizes.heldout, hidden_size), 1 / math.sqrt(hidden_size))
    params["readout_b"] = torch.log(sizes.mean_counts.clamp_min(1e-4)).float()
    return params


def apply(params, heldin, fwd_steps: int, *, dropout: float = 0.0, training: bool = False):
    hidden = params["rnn_w_hh"].shape[1]
    x = spike_dropout(heldin, dropout, training)
    states, _ = _gru(params, ("rnn",), x, x.new_zeros(1, x.shape[0], hidden), reverse=(False,))
    states = states[0]
    latents = torch.cat([states, states[:, -1:].expand(-1, fwd_steps, -1)], 1)
    return F.linear(latents, params["readout_w"], params["readout_b"]), latents
