"""The Poisson loss, a pure function with a fused backward."""
import torch


def poisson_nll(logrates: torch.Tensor, spikes: torch.Tensor) -> torch.Tensor:
    """Mean Poisson negative log-likelihood (without the constant log k! term) of ``spikes``
    under ``exp(logrates)``; both ``(trials, bins, neurons)``. The same value as
    ``F.poisson_nll_loss(logrates, spikes, log_input=True)``, computed in float32 under mixed
    precision, where exp() of half-precision log-rates loses the small rates of 5 ms bins.
    A NaN in ``spikes`` marks an unknown entry (an eval trial's held-out neurons, when a run
    also trains on the eval trials' held-in spikes): the mean and its gradient leave it out."""
    return _PoissonNLL.apply(logrates, spikes)


class _PoissonNLL(torch.autograd.Function):
    """``mean(exp(x) - k x)`` over the known entries, whose backward is the one fused expression
    ``(exp(x) - k) / n``, reusing the forward's ``exp(x)``: autograd through
    ``F.poisson_nll_loss`` takes six elementwise passes over the largest tensor of a training step."""

    @staticmethod
    def forward(ctx, logrates, spikes):
        x, k = logrates.float(), spikes.float()
        rates = x.exp()
        known = k.numel()
        if torch.isnan(k.sum()):  # a NaN anywhere makes the sum NaN: one cheap pass when there is none
            unknown = torch.isnan(k)
            known -= int(unknown.sum())
            k = k.masked_fill(unknown, 0)
            rates = rates.masked_fill(unknown, 0)  # the exp(x) of an unknown entry counts nowhere
            x = x.masked_fill(unknown, 0)
        ctx.dtype, ctx.known = logrates.dtype, known
        ctx.save_for_backward(rates, k)
        return (rates.sum() - torch.dot(k.reshape(-1), x.reshape(-1))) / known

    @staticmethod
    def backward(ctx, grad_loss):
        rates, k = ctx.saved_tensors  # an unknown entry's rate and count are both 0: no gradient
        return (rates - k).mul_(grad_loss / ctx.known).to(ctx.dtype), None
