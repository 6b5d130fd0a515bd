"""The per-epoch co-bps equals nlb_tools' own."""
import numpy as np
import pytest
from nlb_tools.evaluation import bits_per_spike as nlb_bits_per_spike

from nlbfab.evaluation import bits_per_spike


@pytest.mark.parametrize("missing", [0.0, 0.3])
def test_bits_per_spike_equals_nlb_tools(missing):
    rng = np.random.default_rng(1)
    rates = rng.gamma(2.0, 0.1, (40, 25, 7)).astype(np.float32)
    spikes = rng.poisson(rates).astype(np.float64)
    spikes[..., 2] = 0  # a silent neuron: its null rate is 0, read as 1e-9
    rates[0, 0, :] = 0  # zero rates, read as 1e-9
    spikes[rng.random(spikes.shape) < missing] = np.nan  # dmfc_rsg's NaN bins
    expected = nlb_bits_per_spike(rates.astype(np.float64), spikes.copy())
    assert bits_per_spike(rates, spikes) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_bits_per_spike_ranks_better_rates_higher():
    rng = np.random.default_rng(2)
    truth = rng.gamma(2.0, 0.2, (30, 20, 5))
    spikes = rng.poisson(truth).astype(np.float64)
    flat = np.broadcast_to(truth.mean((0, 1)), truth.shape)
    assert bits_per_spike(truth, spikes) > 0.05 > abs(bits_per_spike(flat, spikes))
