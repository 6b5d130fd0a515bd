"""The Poisson loss, a pure function."""
import torch
import torch.nn.functional as F


def poisson_nll(logrates: torch.Tensor, spikes: torch.Tensor) -> torch.Tensor:
    """Mean Poisson negative log-likelihood (without the constant log k! term) of ``spikes``
    under ``exp(logrates)``; both ``(trials, bins, neurons)``. Computed in float32 under mixed
    precision, where exp() of half-precision log-rates loses the small rates of 5 ms bins."""
    return F.poisson_nll_loss(logrates.float(), spikes.float(), log_input=True, full=False)
