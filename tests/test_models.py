"""Models are pure functions: shapes, determinism, fwd_steps, and the loss."""
import pytest
import torch

from nlbfab.loss import poisson_nll
from nlbfab.models.dropout import spike_dropout
from nlbfab.models import gru as gru_module
from nlbfab.models.gru import GRULayers, _fused_gru, fused_train_mode, gru
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


def _torch_gru_and_weights(inputs: int, hidden: int, bidirectional: bool):
    """A float64 ``torch.nn.GRU`` and its weights in ``nlbfab.models.gru.gru``'s layout."""
    torch.manual_seed(0)
    reference = torch.nn.GRU(inputs, hidden, batch_first=True, bidirectional=bidirectional).double()
    suffixes = ("_l0", "_l0_reverse") if bidirectional else ("_l0",)
    weights = [{"w_ih": getattr(reference, f"weight_ih{s}"), "w_hh": getattr(reference, f"weight_hh{s}"),
                "b_ih": getattr(reference, f"bias_ih{s}"), "b_hh": getattr(reference, f"bias_hh{s}")} for s in suffixes]
    return reference, weights


@pytest.mark.parametrize("bidirectional", [True, False])
def test_the_gru_matches_torch_nn_gru_in_values_and_gradients(bidirectional):
    reference, weights = _torch_gru_and_weights(4, 6, bidirectional)
    directions = 2 if bidirectional else 1
    x = torch.randn(5, 9, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(directions, 5, 6, dtype=torch.float64, requires_grad=True)
    expected, expected_h_n = reference(x, h0)
    outputs, h_n = gru(x, h0, weights, (False, True)[:directions])
    got = torch.cat(list(outputs), -1)  # nn.GRU concatenates the directions' features
    assert torch.allclose(got, expected, atol=1e-12) and torch.allclose(h_n, expected_h_n, atol=1e-12)
    wrt = [x, h0, *reference.parameters()]
    # a loss that weighs every output and final state differently
    loss = lambda out, fin: (out * torch.linspace(-1, 2, out.shape[-1], dtype=torch.float64)).pow(2).sum() + fin.pow(3).sum()  # noqa: E731
    expected_grads = torch.autograd.grad(loss(expected, expected_h_n), wrt)
    grads = torch.autograd.grad(loss(got, h_n), wrt)
    for name, g, e in zip(["inputs", "h0", *(n for n, _ in reference.named_parameters())], grads, expected_grads):
        assert torch.allclose(g, e, atol=1e-10), name


def test_the_gpu_path_computes_the_same_gru_and_gradients():
    """On CUDA ``gru`` hands each GRU to cuDNN through ``aten::gru``; that path runs on the CPU too."""
    _, weights = _torch_gru_and_weights(4, 6, True)
    x = torch.randn(5, 9, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    ours, ours_h_n = gru(x, h0, weights, (False, True))
    fused, fused_h_n = _fused_gru(x, h0, weights, (False, True), train=True)
    assert torch.allclose(ours, fused, atol=1e-12) and torch.allclose(ours_h_n, fused_h_n, atol=1e-12)
    wrt = [x, h0, *(w[name] for w in weights for name in ("w_ih", "w_hh", "b_ih", "b_hh"))]
    for ours_grad, fused_grad in zip(torch.autograd.grad((ours.pow(2).sum() + ours_h_n.sum()), wrt),
                                     torch.autograd.grad((fused.pow(2).sum() + fused_h_n.sum()), wrt)):
        assert torch.allclose(ours_grad, fused_grad, atol=1e-10)


def test_the_fused_kernel_trains_exactly_when_gradients_are_recorded_on_a_gpu():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert fused_train_mode(cuda, grad_enabled=True) is True
    assert fused_train_mode(cuda, grad_enabled=False) is False
    assert fused_train_mode(cpu, grad_enabled=True) is False  # the CPU runs GRULayers, not aten::gru


def test_the_fused_path_passes_train_to_aten_gru_in_training_and_not_in_inference(monkeypatch):
    """cuDNN's backward fails unless the forward ran in training mode; no GPU runs here, so the
    CPU is made a fused device and the arguments reaching ``aten::gru`` are recorded."""
    calls = []

    def recording_gru(*args):
        calls.append(args[6])  # (input, hx, params, has_biases, num_layers, dropout, train, ...)
        return torch.ops.aten.gru.input(*args)

    monkeypatch.setattr(gru_module, "FUSED_DEVICES", ("cpu",))
    monkeypatch.setattr(gru_module, "aten_gru", recording_gru)
    model = MODELS["sae"]
    params = {k: v.requires_grad_() for k, v in model.init(SIZES, 0).items()}
    logrates, _ = model.apply(params, torch.rand(4, 12, 6), 2, dropout=0.2, training=True)
    logrates.sum().backward()
    assert calls == [True, True, True] and params["enc_fwd_w_hh"].grad is not None  # encoder pair, decoder
    calls.clear()
    with torch.no_grad():
        model.apply(params, torch.rand(4, 12, 6), 2)
    assert calls == [False, False, False]


def test_the_fused_path_hands_aten_gru_its_weights_as_one_chunk_and_their_gradients_reach_them(monkeypatch):
    """cuDNN copies weights held apart into one buffer at every call and prints a warning each
    time; handed as views into one buffer in (w_ih, w_hh, b_ih, b_hh) order, they are used as
    they are. The gradients still reach the weights, equal to those of the kernel given them apart."""
    chunks = []

    def recording_gru(*args):
        params = args[2]
        one_storage = len({p.untyped_storage().data_ptr() for p in params}) == 1
        ends = [p.storage_offset() + p.numel() for p in params]
        starts = [p.storage_offset() for p in params]
        chunks.append(one_storage and all(p.is_contiguous() for p in params) and starts == [0, *ends[:-1]])
        return torch.ops.aten.gru.input(*args)

    _, weights = _torch_gru_and_weights(4, 6, True)
    x, h0 = torch.randn(3, 7, 4, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    expected = torch.autograd.grad(sum(t.sum() for t in gru(x, h0, weights, (False, True))), weights[1]["w_hh"])[0]
    monkeypatch.setattr(gru_module, "FUSED_DEVICES", ("cpu",))
    monkeypatch.setattr(gru_module, "aten_gru", recording_gru)
    outputs, h_n = gru(x, h0, weights, (False, True))
    grad = torch.autograd.grad(outputs.sum() + h_n.sum(), weights[1]["w_hh"])[0]
    assert chunks == [True, True]  # each direction's four weights in one chunk
    torch.testing.assert_close(grad, expected)


def test_the_gru_recurrence_passes_gradcheck():
    d = lambda *shape: torch.randn(*shape, dtype=torch.float64, requires_grad=True)  # noqa: E731
    h = 3
    args = (d(4, 2, 5), d(2, 2, h), d(2, 3 * h, 5), d(2, 3 * h, h), d(2, 3 * h), d(2, 3 * h))
    assert torch.autograd.gradcheck(lambda *a: GRULayers.apply(*a, (False, True)), args)


def test_the_gru_runs_in_bfloat16_under_autocast_and_returns_float32_gradients():
    reference, weights = _torch_gru_and_weights(4, 6, True)
    weights = [{k: v.detach().float().requires_grad_() for k, v in w.items()} for w in weights]
    x = torch.randn(3, 7, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs, h_n = gru(x, torch.zeros(2, 3, 6), weights, (False, True))
    assert outputs.dtype == torch.bfloat16
    h_n.float().sum().backward()
    assert weights[1]["w_hh"].grad.dtype == torch.float32 and torch.isfinite(weights[1]["w_hh"].grad).all()
    exact, _ = gru(x, torch.zeros(2, 3, 6), weights, (False, True))
    assert torch.allclose(outputs.float(), exact, atol=0.05)


def test_poisson_loss_is_smallest_at_the_true_rate():
    spikes = torch.poisson(torch.full((200, 10, 3), 2.0), generator=torch.Generator().manual_seed(0))
    losses = {rate: float(poisson_nll(torch.full_like(spikes, rate).log(), spikes)) for rate in (1.0, 2.0, 4.0)}
    assert min(losses, key=losses.get) == 2.0


def test_poisson_loss_and_its_gradient_equal_torchs():
    logrates = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    spikes = torch.poisson(torch.full((4, 6, 5), 1.5, dtype=torch.float64))
    ours = poisson_nll(logrates, spikes)
    (grad,) = torch.autograd.grad(ours, logrates)
    reference = torch.nn.functional.poisson_nll_loss(logrates.float(), spikes.float(), log_input=True)
    (expected,) = torch.autograd.grad(reference, logrates)
    assert ours.dtype == torch.float32 and torch.allclose(ours, reference, rtol=1e-6)
    assert grad.dtype == torch.float64 and torch.allclose(grad, expected, atol=1e-7)


def test_poisson_loss_leaves_unknown_entries_out_of_its_mean_and_gradient():
    """NaN spikes (an eval trial's held-out neurons, trained on with --train-eval-heldin) count
    nowhere: the loss and gradient are those of the known entries alone."""
    logrates = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    spikes = torch.poisson(torch.full((4, 6, 5), 1.5, dtype=torch.float64))
    unknown = torch.zeros_like(spikes, dtype=torch.bool)
    unknown[2:, :, 3:] = True
    ours = poisson_nll(logrates, spikes.masked_fill(unknown, float("nan")))
    (grad,) = torch.autograd.grad(ours, logrates)
    known = ~unknown
    reference = torch.nn.functional.poisson_nll_loss(logrates[known].float(), spikes[known].float(), log_input=True)
    (expected,) = torch.autograd.grad(reference, logrates)
    assert torch.isfinite(ours) and torch.allclose(ours, reference, rtol=1e-6)
    assert torch.all(grad[unknown] == 0) and torch.allclose(grad, expected, atol=1e-7)


def test_an_unknown_model_lists_the_known_ones():
    with pytest.raises(UserError, match="choose one of sae, gru_readout, lfads"):
        get_model("ndt")


def test_spike_dropout_zeroes_counts_with_probability_p_and_rescales_the_rest():
    torch.manual_seed(0)
    spikes = torch.poisson(torch.full((200, 50, 30), 0.3))
    dropped = spike_dropout(spikes, 0.25, training=True)
    kept = dropped[spikes > 0] != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    assert torch.allclose(dropped[spikes > 0][kept], spikes[spikes > 0][kept] / 0.75)
    assert (dropped[spikes == 0] == 0).all()
    assert torch.equal(spike_dropout(spikes, 0.25, training=False), spikes)


@pytest.mark.parametrize("path", ["kernel", "fused"])
def test_gru_with_inputs_of_their_own_equals_each_gru_run_alone(path):
    """An ensemble's members read the same batch through their own dropout masks."""
    _, weights = _torch_gru_and_weights(4, 6, True)
    x = torch.randn(2, 5, 9, 4, dtype=torch.float64, requires_grad=True)  # (D, batch, time, features)
    h0 = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    run = gru if path == "kernel" else (lambda *a: _fused_gru(*a, train=True))
    together, together_h_n = run(x, h0, weights, (False, True))
    alone = [run(x[d], h0[d:d + 1], weights[d:d + 1], ((False, True)[d],)) for d in range(2)]
    assert torch.allclose(together, torch.cat([a[0] for a in alone]), atol=1e-12)
    assert torch.allclose(together_h_n, torch.cat([a[1] for a in alone]), atol=1e-12)
    wrt = [x, h0, *weights[0].values(), *weights[1].values()]
    grads = torch.autograd.grad(together.pow(2).sum() + together_h_n.sum(), wrt)
    expected = torch.autograd.grad(sum(a[0].pow(2).sum() + a[1].sum() for a in alone), wrt)
    for g, e in zip(grads, expected):
        assert torch.allclose(g, e, atol=1e-10)


def test_the_recurrence_with_inputs_of_their_own_passes_gradcheck():
    d = lambda *shape: torch.randn(*shape, dtype=torch.float64, requires_grad=True)  # noqa: E731
    h = 3
    args = (d(2, 4, 2, 5), d(2, 2, h), d(2, 3 * h, 5), d(2, 3 * h, h), d(2, 3 * h), d(2, 3 * h))
    assert torch.autograd.gradcheck(lambda *a: GRULayers.apply(*a, (False, True)), args)
