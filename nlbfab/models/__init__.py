"""Models as pairs of pure functions, selected by name on the command line.

A model is ``init(sizes, seed, **hparams) -> params`` (a plain dict of tensors) and
``apply(params, heldin, fwd_steps, *, dropout, training) -> (logrates, latents)`` with
``heldin: (trials, bins, heldin)``, ``logrates: (trials, bins + fwd_steps, heldin + heldout)``
and ``latents: (trials, bins + fwd_steps, latent_dim)``. The loop, the hooks, the checkpoints
and the submission need nothing else. Add one by writing the two functions and registering
them in ``MODELS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from nlbfab.errors import UserError
from nlbfab.models import gru_readout, sae


@dataclass(frozen=True)
class Sizes:
    """What a model's ``init`` needs to know about the split."""

    heldin: int
    heldout: int
    bins: int
    fwd_steps: int
    mean_counts: torch.Tensor  # (heldin + heldout,) mean spikes per bin on train trials


@dataclass(frozen=True)
class Model:
    name: str
    init: Callable[..., dict[str, torch.Tensor]]
    apply: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    hparams: tuple[str, ...]  # the keyword arguments of ``init`` it takes from the command line


MODELS = {
    "sae": Model("sae", sae.init, sae.apply, ("hidden_size",)),
    "gru_readout": Model("gru_readout", gru_readout.init, gru_readout.apply, ("hidden_size",)),
}


def get_model(name: str) -> Model:
    if name not in MODELS:
        raise UserError(f"unknown model '{name}': choose one of {', '.join(MODELS)}")
    return MODELS[name]
