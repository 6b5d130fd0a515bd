"""Dropout on spike counts, drawing the mask only where there are spikes."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def spike_dropout(spikes: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(spikes, p, training)`` in distribution: each count is zeroed with probability
    ``p`` and the rest scaled by ``1 / (1 - p)``. A zero count stays zero whatever its mask, and
    most bins are empty (95% at 5 ms), so on a CPU only the nonzero counts draw a random number
    (benchmarks/README.md). On a GPU, where ``nonzero`` waits
    for the device, it is ``F.dropout``. ``spikes`` needs no gradient (it is data)."""
    if not training or p == 0 or spikes.is_cuda:
        return F.dropout(spikes, p, training)
    flat = spikes.reshape(-1)
    index = flat.nonzero().squeeze(1)
    index = index[torch.rand(index.numel(), device=spikes.device) >= p]
    dropped = torch.zeros_like(flat)
    dropped[index] = flat[index] / (1 - p)
    return dropped.view_as(spikes)
