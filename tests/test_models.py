"""Models are pure functions: shapes, determinism, fwd_steps, and the loss."""
import pytest
import torch

from nlbfab.loss import poisson_nll
from nlbfab.models import MODELS, Sizes, get_model
from nlbfab.errors import UserError

SIZES = Sizes(heldin=6, heldout=3, bins=12, fwd_steps=4, mean_counts=torch.full((9,), 0.3))


@pytest.mark.parametrize("name", list(MODELS))
def test_apply_returns_logrates_and_latents_over_observed_and_forward_bins(name):
    model = MODELS[name]
    params = model.init(SIZES, seed=1)
    heldin = torch.poisson(torch.full((5, 12, 6), 0.5))
    for fwd in (0, 4, 7):
        logrates, latents = model.apply(params, heldin, fwd)
        assert logrates.shape == (5, 12 + fwd, 9) and latents.shape[:2] == (5, 12 + fwd)


@pytest.mark.parametrize("name", list(MODELS))
def test_init_is_deterministic_in_the_seed_and_apply_is_pure(name):
    model = MODELS[name]
    a, b, c = model.init(SIZES, 3), model.init(SIZES, 3), model.init(SIZES, 4)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    heldin = torch.rand(2, 12, 6)
    before = {k: v.clone() for k, v in a.items()}
    first, _ = model.apply(a, heldin, 4)
    second, _ = model.apply(a, heldin, 4)
    assert torch.equal(first, second) and all(torch.equal(before[k], a[k]) for k in a)


def test_readout_bias_starts_at_the_mean_rate():
    params = MODELS["sae"].init(SIZES, 0)
    assert torch.allclose(params["readout_b"].exp(), SIZES.mean_counts)


def test_dropout_acts_only_in_training():
    model = MODELS["sae"]
    params, heldin = model.init(SIZES, 0), torch.rand(4, 12, 6)
    torch.manual_seed(0)
    train_a, _ = model.apply(params, heldin, 2, dropout=0.5, training=True)
    train_b, _ = model.apply(params, heldin, 2, dropout=0.5, training=True)
    eval_a, _ = model.apply(params, heldin, 2, dropout=0.5, training=False)
    eval_b, _ = model.apply(params, heldin, 2, dropout=0.0, training=False)
    assert not torch.equal(train_a, train_b) and torch.equal(eval_a, eval_b)


def test_the_fused_gru_matches_torch_nn_gru():
    params = MODELS["sae"].init(SIZES, 0)
    gru = torch.nn.GRU(1, params["dec_w_hh"].shape[1], batch_first=True)
    with torch.no_grad():
        for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
            getattr(gru, f"{'weight' if name[0] == 'w' else 'bias'}_{name[2:]}_l0").copy_(params[f"dec_{name}"])
    h0 = torch.randn(1, 3, gru.hidden_size)
    expected, _ = gru(torch.zeros(3, 7, 1), h0)
    from nlbfab.models.sae import _gru
    got, _ = _gru(params, ("dec",), torch.zeros(3, 7, 1), h0, bidirectional=False)
    assert torch.allclose(got, expected, atol=1e-6)


def test_poisson_loss_is_smallest_at_the_true_rate():
    spikes = torch.poisson(torch.full((200, 10, 3), 2.0), generator=torch.Generator().manual_seed(0))
    losses = {rate: float(poisson_nll(torch.full_like(spikes, rate).log(), spikes)) for rate in (1.0, 2.0, 4.0)}
    assert min(losses, key=losses.get) == 2.0


def test_an_unknown_model_lists_the_known_ones():
    with pytest.raises(UserError, match="choose one of sae, gru_readout"):
        get_model("lfads")
