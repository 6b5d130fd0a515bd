"""LFADS: its KL terms, prior and coordinated dropout against hand computations, deterministic
inference, the decoder's autograd Function against gradcheck and the step-by-step autograd loop,
and training through the loop (loss terms logged, resume, DDP)."""
import json
import math
from pathlib import Path

import h5py
import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from nlbfab.loss import poisson_nll
from nlbfab.models import MODELS, Sizes, lfads, lfads_decoder
from tests.conftest import homes_with

SIZES = Sizes(heldin=6, heldout=3, bins=12, fwd_steps=4, mean_counts=torch.full((9,), 0.3))
SMALL = dict(ic_enc_dim=8, ci_enc_dim=8, con_dim=8, co_dim=2, ic_dim=8, gen_dim=16, fac_dim=4)


def test_the_initial_conditions_kl_is_the_closed_form_gaussian_kl():
    torch.manual_seed(0)
    mean, std = torch.randn(5, 3), torch.rand(5, 3) + 0.1
    prior_mean, prior_logvar = torch.randn(3), torch.randn(3)
    expected = kl_divergence(Independent(Normal(mean, std), 1),
                             Independent(Normal(prior_mean, (0.5 * prior_logvar).exp()), 1)).mean()
    assert torch.allclose(lfads.kl_normal(mean, std, prior_mean, prior_logvar), expected, atol=1e-6)


def test_the_ar1_prior_by_hand():
    u = torch.tensor([[[0.5], [-0.2], [0.1]]])  # one trial, three steps, one input
    tau, nvar = 2.0, 0.3
    alpha = math.exp(-1 / tau)
    def log_normal(x, mean, var):
        return -0.5 * math.log(2 * math.pi * var) - (x - mean) ** 2 / (2 * var)
    expected = (log_normal(0.5, 0, nvar / (1 - alpha ** 2)) + log_normal(-0.2, alpha * 0.5, nvar)
                + log_normal(0.1, alpha * -0.2, nvar))
    got = lfads.ar1_log_prob(u, torch.tensor([math.log(tau)]), torch.tensor([math.log(nvar)]))
    assert got.shape == (1,) and abs(float(got) - expected) < 1e-5
    mean, std = torch.full_like(u, 0.1), torch.full_like(u, 0.5)
    log_q = sum(log_normal(float(x), 0.1, 0.25) for x in u.flatten())
    kl = lfads.kl_ar1(u, mean, std, torch.tensor([math.log(tau)]), torch.tensor([math.log(nvar)]))
    assert abs(float(kl) - (log_q - expected)) < 1e-5


def test_a_diverged_runs_nan_makes_a_nan_kl_for_the_loops_nan_stop_not_a_traceback():
    u = torch.tensor([[[float("nan")], [0.1]]])  # NaN weights after an update too large
    std = torch.tensor([[[float("nan")], [1.0]]])
    kl = lfads.kl_ar1(u, u, std, torch.tensor([[1.0]]), torch.tensor([[float("nan")]]))
    assert torch.isnan(kl).all()


def test_the_warm_up_ramps_from_zero_to_one():
    assert [lfads.ramp(e, 0, 3) for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [lfads.ramp(e, 2, 1) for e in range(4)] == [0.0, 0.0, 0.5, 1.0]


def test_coordinated_dropout_hides_entries_and_trains_only_on_them():
    torch.manual_seed(0)
    heldin = torch.poisson(torch.full((200, 12, 6), 1.0))
    masked, hidden = lfads.coordinated_dropout(heldin, 0.3)
    assert abs(hidden.float().mean().item() - 0.3) < 0.02
    assert torch.equal(masked[hidden], torch.zeros(int(hidden.sum())))
    assert torch.allclose(masked[~hidden], heldin[~hidden] / 0.7)
    logrates = torch.randn(200, 16, 9, requires_grad=True)
    target = torch.poisson(torch.full((200, 16, 9), 1.0))
    loss = lfads.coordinated_dropout_loss(logrates, target, hidden)
    assert torch.allclose(loss, poisson_nll(logrates, target))  # the value covers every entry
    (grad,) = torch.autograd.grad(loss, logrates)
    (full,) = torch.autograd.grad(poisson_nll(logrates, target), logrates)
    visible = torch.zeros_like(grad, dtype=torch.bool)
    visible[:, :12, :6] = ~hidden
    assert torch.all(grad[visible] == 0)  # no gradient from what the input showed
    assert torch.allclose(grad[~visible], full[~visible])


def test_coordinated_dropout_trains_nothing_on_unknown_entries():
    """An eval trial's held-out neurons and forward bins are NaN under --train-eval-heldin: they
    give no gradient, and the loss is that of the known entries."""
    torch.manual_seed(0)
    heldin = torch.poisson(torch.full((20, 12, 6), 1.0))
    _, hidden = lfads.coordinated_dropout(heldin, 0.3)
    logrates = torch.randn(20, 16, 9, requires_grad=True)
    target = torch.poisson(torch.full((20, 16, 9), 1.0))
    unknown = torch.zeros_like(target, dtype=torch.bool)
    unknown[10:, 12:] = True
    unknown[10:, :, 6:] = True
    loss = lfads.coordinated_dropout_loss(logrates, target.masked_fill(unknown, float("nan")), hidden)
    assert torch.isfinite(loss)
    assert torch.allclose(loss, torch.nn.functional.poisson_nll_loss(logrates[~unknown], target[~unknown]))
    (grad,) = torch.autograd.grad(loss, logrates)
    assert torch.all(grad[unknown] == 0) and torch.all(grad[10:, :12, :6][hidden[10:]] != 0)


def test_inference_uses_the_posterior_means_and_is_deterministic():
    model = MODELS["lfads"]
    params = model.init(SIZES, 0, **SMALL)
    heldin = torch.poisson(torch.full((4, 12, 6), 0.5))
    first, factors = model.apply(params, heldin, 4)
    again, _ = model.apply(params, heldin, 4, dropout=0.3)
    assert torch.equal(first, again) and first.shape == (4, 16, 9) and factors.shape == (4, 16, 4)
    sampled, _ = model.apply(params, heldin, 4, training=True)
    assert not torch.equal(first, sampled)


def test_the_submissions_rates_are_the_mean_of_passes_under_coordinated_dropout():
    model = MODELS["lfads"]
    params = model.init(SIZES, 0, **SMALL, submit_passes=5)
    heldin = torch.poisson(torch.full((4, 12, 6), 0.5))
    with torch.no_grad():
        logrates, factors = lfads.submission_apply_members([params], heldin, 4)
        generator, by_hand = torch.Generator().manual_seed(0), []
        for _ in range(5):
            hidden = torch.rand(heldin.shape, generator=generator) < 0.3
            by_hand.append(lfads.apply(params, heldin.masked_fill(hidden, 0) / 0.7, 4)[0].exp())
        plain, plain_factors = lfads.apply(params, heldin, 4)
        again, _ = lfads.submission_apply_members([params], heldin, 4)
        one_pass = model.init(SIZES, 0, **SMALL, submit_passes=1)
        single, _ = lfads.submission_apply_members([one_pass], heldin, 4)
        other = model.init(SIZES, 1, **SMALL, submit_passes=5)
        both, _ = lfads.submission_apply_members([params, other], heldin, 4)
        alone, _ = lfads.submission_apply_members([other], heldin, 4)
    assert torch.allclose(logrates[0], torch.stack(by_hand).mean(0).log(), atol=1e-6)
    assert not torch.allclose(logrates[0], plain, atol=1e-3)
    assert torch.equal(factors[0], plain_factors)  # the latents: the pass on every input
    assert torch.equal(again, logrates)  # deterministic
    assert torch.equal(single[0], plain)  # one pass: every input
    assert torch.allclose(both, torch.cat([logrates, alone]), atol=1e-6)  # members batched as alone


def test_the_inferred_inputs_are_what_drives_the_generator():
    """Unrolled by hand from the initial condition's posterior mean, a generator fed the inferred
    inputs gives ``apply``'s factors; the inputs are deterministic and reach the forward bins."""
    model = MODELS["lfads"]
    params = model.init(SIZES, 0, **SMALL)
    heldin = torch.poisson(torch.full((4, 12, 6), 0.5))
    inputs = model.inferred_inputs(params, heldin, 4)
    assert inputs.shape == (4, 16, SMALL["co_dim"]) and torch.equal(inputs, model.inferred_inputs(params, heldin, 4))
    assert inputs.abs().sum() > 0
    ic_mean, _, _ = lfads._encode(lfads._stacked([params]), heldin[None], 0.0, training=False)
    clip = float(params["cell_clip"])
    gen = torch.nn.functional.linear(ic_mean[0], params["g0_w"], params["g0_b"]).clamp(-clip, clip)
    readout = torch.nn.functional.normalize(params["fac_w"], dim=1)
    factors = []
    for t in range(16):
        gates = torch.nn.functional.linear(inputs[:, t], params["gen_w_ih"], params["gen_b_ih"])
        gen = lfads._cell(gates, gen, params["gen_w_hh"], clip)
        factors.append(torch.nn.functional.linear(gen, readout))
    _, applied = model.apply(params, heldin, 4)
    assert torch.allclose(torch.stack(factors, 1), applied, atol=1e-5)
    assert MODELS["sae"].inferred_inputs is None and MODELS["gru_readout"].inferred_inputs is None


def test_the_training_loss_adds_warmed_up_kl_and_l2_terms():
    model = MODELS["lfads"]
    params = model.init(SIZES, 0, **SMALL, l2_scale=1.0, kl_ic_scale=1.0, kl_co_scale=1.0, kl_increase_epoch=1,
                        l2_increase_epoch=1)
    heldin, target = torch.poisson(torch.full((4, 12, 6), 0.5)), torch.poisson(torch.full((4, 16, 9), 0.5))
    torch.manual_seed(1)
    loss, terms = model.training_loss(params, heldin, target, dropout=0.0, epoch=1)  # ramps at 1
    assert set(terms) == {"recon", "kl_ic", "kl_co", "l2"}
    assert torch.allclose(loss, terms["recon"] + terms["kl_ic"] + terms["kl_co"] + terms["l2"], rtol=1e-5)
    torch.manual_seed(1)
    first_epoch, same_terms = model.training_loss(params, heldin, target, dropout=0.0, epoch=0)  # ramps at 0.5
    half = terms["recon"] + 0.5 * (terms["kl_ic"] + terms["kl_co"] + terms["l2"])
    assert torch.allclose(first_epoch, half, rtol=1e-5) and torch.allclose(same_terms["kl_co"], terms["kl_co"])
    assert torch.allclose(terms["l2"], lfads.l2_recurrent(params))


def decoder_inputs(dtype=torch.float64, sample=True, dropout=True, clip=0.5, members=1, seed=0):
    """``lfads_decoder.decode``'s arguments at tiny sizes (5 steps, ``members`` members of 3
    trials), the tensors to differentiate first. Initial states within the clip, as
    ``lfads._decode`` clamps them; with a clip below 1 the clamp acts on some later states."""
    steps, trials, con, gen, fac, co = 5, 3, 4, 5, 3, 2
    g = torch.Generator().manual_seed(seed)
    def leaf(*shape, bound=None):
        x = torch.randn(*shape, generator=g, dtype=dtype)
        return (x.clamp(-bound, bound) if bound else x).requires_grad_()
    def keep(*shape):
        return (torch.rand(*shape, generator=g) >= 0.3).to(dtype) / 0.7 if dropout else None
    bound, k = min(clip, 1), members
    differentiable = [leaf(k, steps, trials, 3 * con), leaf(k, trials, con, bound=bound),
                      leaf(k, trials, gen, bound=bound), leaf(k, trials, fac), leaf(k, 3 * con, fac),
                      leaf(k, 3 * con, con), leaf(k, 2 * co, con), leaf(k, 2 * co), leaf(k, 3 * gen, co),
                      leaf(k, 3 * gen), leaf(k, 3 * gen, gen), leaf(k, fac, gen)]
    noise = torch.randn(k, steps, trials, co, generator=g, dtype=dtype) if sample else None
    return differentiable, [keep(k, steps, trials, fac), keep(k, steps, trials, gen), noise, clip]


def weighed(outputs, seed=1):
    """A loss that weighs every output entry differently."""
    g = torch.Generator().manual_seed(seed)
    return sum((x * torch.randn(x.shape, generator=g, dtype=x.dtype)).sum() for x in outputs)


# (sample, dropout, clip, members): one model and an ensemble's members stepping together
CASES = [(True, True, 0.5, 2), (False, False, 0.5, 1), (True, False, 5.0, 1), (False, True, 5.0, 3)]


@pytest.mark.parametrize("sample, dropout, clip, members", CASES)
def test_the_decoder_recurrence_passes_gradcheck(sample, dropout, clip, members):
    differentiable, rest = decoder_inputs(sample=sample, dropout=dropout, clip=clip, members=members)
    if clip < 1:  # the clamp acts
        unclamped = lfads._unroll(*differentiable, *rest[:-1], math.inf)
        assert not torch.allclose(lfads._unroll(*differentiable, *rest)[0], unclamped[0])
    assert torch.autograd.gradcheck(lambda *x: lfads_decoder.ControllerGenerator.apply(*x, *rest), differentiable)


@pytest.mark.parametrize("sample, dropout, clip, members", CASES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, dict(rtol=0, atol=1e-10)),
                                              (torch.float32, dict(rtol=1e-4, atol=1e-5))])
def test_the_decoder_function_computes_the_autograd_loops_values_and_gradients(sample, dropout, clip, members, dtype,
                                                                               tolerance):
    differentiable, rest = decoder_inputs(dtype, sample, dropout, clip, members)
    ours, reference = lfads_decoder.decode(*differentiable, *rest), lfads._unroll(*differentiable, *rest)
    for name, x, y in zip(("factors", "means", "stds", "inputs"), ours, reference):
        torch.testing.assert_close(x, y, **tolerance, msg=name)
    for x, y in zip(torch.autograd.grad(weighed(ours), differentiable),
                    torch.autograd.grad(weighed(reference), differentiable)):
        torch.testing.assert_close(x, y, **tolerance)


def test_the_training_loss_and_its_gradient_are_those_of_the_step_by_step_decoder(monkeypatch):
    model = MODELS["lfads"]
    params = {k: v.double() for k, v in model.init(SIZES, 0, **SMALL, kl_ic_scale=1.0, kl_co_scale=1.0).items()}
    trained = [k for k in params if k not in lfads.FIXED]
    heldin, target = torch.poisson(torch.full((4, 12, 6), 0.5)).double(), torch.poisson(torch.full((4, 16, 9), 0.5))
    def loss_and_grads(decoder):
        monkeypatch.setattr(lfads, "decode", decoder)
        weights = {k: v.clone().requires_grad_(k in trained) for k, v in params.items()}
        torch.manual_seed(2)
        loss, terms = model.training_loss(weights, heldin, target, dropout=0.3, epoch=0)
        return loss, terms, torch.autograd.grad(loss, [weights[k] for k in trained])
    ours, reference = loss_and_grads(lfads_decoder.decode), loss_and_grads(lfads._unroll)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-10, atol=0)
    assert all(torch.allclose(ours[1][k], reference[1][k], rtol=1e-10, atol=0) for k in ours[1])
    for name, x, y in zip(trained, ours[2], reference[2]):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-12, msg=name)


def test_the_decoder_runs_in_bfloat16_under_autocast_and_returns_float32_gradients():
    differentiable, rest = decoder_inputs(torch.float32, clip=5.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = lfads_decoder.decode(*differentiable, *rest)
    assert all(x.dtype == torch.bfloat16 for x in outputs)
    grads = torch.autograd.grad(weighed(x.float() for x in outputs), differentiable)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    exact = lfads_decoder.decode(*differentiable, *rest)
    assert all(torch.allclose(x.float(), y, atol=0.1, rtol=0.05) for x, y in zip(outputs, exact))


def test_inference_without_gradients_runs_the_decoder_forward_alone():
    model = MODELS["lfads"]
    params = {k: v.requires_grad_(k not in lfads.FIXED) for k, v in model.init(SIZES, 0, **SMALL).items()}
    heldin = torch.poisson(torch.full((4, 12, 6), 0.5))
    recorded, _ = model.apply(params, heldin, 4)
    with torch.no_grad():
        plain, factors = model.apply(params, heldin, 4)
    assert recorded.grad_fn is not None and plain.grad_fn is None and factors.grad_fn is None
    assert torch.equal(recorded, plain)


def lfads_run(tag, max_epochs, resume=False, **options):
    from nlbfab.train import TrainConfig, train
    config = TrainConfig(**{"split": "mc_rtt-20ms-val", "model": "lfads", "hparams": SMALL, "batch_size": 16,
                            "accelerator": "cpu", "max_epochs": max_epochs, "log_every_n_epochs": 2, "run_tag": tag,
                            **options})
    return train(config, homes_with(), resume=resume, quiet=True)


def test_lfads_trains_through_the_loop_and_logs_its_loss_terms(prepared, homes):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    summary = lfads_run("lfads-loop", 3, save_latents=True)
    assert summary["model"] == "lfads" and math.isfinite(summary["metrics"]["co-bps"])
    events = EventAccumulator(summary["run_dir"]).Reload()
    assert {"loss/recon", "loss/kl_ic", "loss/kl_co", "loss/l2", "nlb/co-bps"} <= set(events.Tags()["scalars"])
    assert {"inputs/inferred", "raster/trial_0"} <= set(events.Tags()["images"])
    # --save-latents keeps the submitted model's factors and inferred inputs of every trial
    from benchmarks.inputs import best_params
    from nlbfab.data import load_split
    from nlbfab.splits import get_split
    _, params = best_params(Path(summary["run_dir"]))
    data = load_split(get_split("mc_rtt-20ms-val"), homes_with())
    with h5py.File(Path(summary["run_dir"], "latents.h5")) as h5, torch.no_grad():
        assert set(h5) == {"train_latents", "eval_latents", "train_inputs", "eval_inputs"}
        inputs = lfads.inferred_inputs(params, data.eval_heldin, data.fwd_steps)
        assert h5["eval_inputs"].shape == (len(data.eval_heldin), data.bins + data.fwd_steps, SMALL["co_dim"])
        assert torch.allclose(torch.from_numpy(h5["eval_inputs"][()]), inputs, atol=1e-5)
        assert h5["train_latents"].shape == (len(data.train_heldin), data.bins + data.fwd_steps, SMALL["fac_dim"])
    # the submission holds the mean of passes under coordinated dropout
    with h5py.File(Path(summary["run_dir"], "rates.h5")) as h5, torch.no_grad():
        (group,) = h5
        submitted = torch.from_numpy(h5[group]["eval_rates_heldout"][()])
        logrates, _ = lfads.submission_apply_members([params], data.eval_heldin, data.fwd_steps)
        assert torch.allclose(submitted, logrates[0, :, :data.bins, data.heldin:].exp(), atol=1e-5)
    checkpoint = torch.load(f"{summary['run_dir']}/checkpoints/best.ckpt", weights_only=False)
    assert "members.0.fixed_cell_clip" in checkpoint["model"] and "cell_clip" not in [
        k.split(".")[-1] for k in checkpoint["model"] if k.startswith("members.0.params.")]
    # the model's own default for the weights' average, recorded with the run's settings
    assert json.loads(Path(summary["run_dir"], "config.json").read_text())["average_decay"] == lfads.AVERAGE_DECAY
    last = torch.load(f"{summary['run_dir']}/checkpoints/last.ckpt", weights_only=False)
    assert last["average"]["steps"] > 0 and last["average"]["weights"].keys() == last["model"].keys()


def test_a_resumed_lfads_run_ends_with_the_same_weights(prepared, homes):
    whole = lfads_run("lfads-whole", 4)
    lfads_run("lfads-parts", 2)
    parts = lfads_run("lfads-parts", 4, resume=True)
    a, b = (torch.load(f"{s['run_dir']}/checkpoints/last.ckpt", weights_only=False)["model"] for s in (whole, parts))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # sampling and dropout resumed too


def test_a_controller_lag_the_split_cannot_take_leaves_no_run_folder_behind(prepared, homes):
    from nlbfab.errors import UserError
    with pytest.raises(UserError, match=r"--ci-lag 1000: must be below"):
        lfads_run("lfads-lag", 1, hparams=SMALL | {"ci_lag": 1000})
    assert not (homes["RUNS_HOME"] / "lfads-lag" / "mc_rtt-20ms-val" / "checkpoints").exists()


def test_lfads_trains_in_bfloat16(prepared, homes):
    summary = lfads_run("lfads-bf16", 2, precision="bf16-mixed")
    assert math.isfinite(summary["best_monitored"])


def test_lfads_ranks_agree_under_ddp(prepared, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).with_name("ddp_check.py")
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(prepared), "2", str(tmp_path), "lfads", json.dumps(SMALL)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}-of-2.pt") for r in (0, 1))
    key = "members.0.params.gen_w_hh"
    assert not torch.equal(rank0["final"][key], rank0["initial"][key])  # it trained
    assert all(torch.equal(rank0["final"][k], rank1["final"][k]) for k in rank0["final"])


def test_each_dataset_gets_lfads_torchs_sizes_and_options_override_them():
    model = MODELS["lfads"]
    maze = model.settle({}, "mc_maze")
    assert model.settle({}) == maze and (maze["ic_enc_dim"], maze["gen_dim"], maze["fac_dim"]) == (64, 100, 40)
    small = model.settle({}, "mc_maze_small")
    assert (small["gen_dim"], small["fac_dim"], small["ci_enc_dim"]) == (100, 40, 80)
    assert model.settle({"gen_dim": 50}, "dmfc_rsg")["gen_dim"] == 50
    assert model.settle({}, "dmfc_rsg")["l2_scale"] > 0
    assert model.settle({}, "mc_rtt")["co_dim"] == 8 and model.settle({}, "mc_maze")["co_dim"] == 4


def test_help_names_the_datasets_where_a_default_differs():
    model = MODELS["lfads"]
    assert model.default_help("co_dim") == "[default: 4; 8 on mc_rtt]"
    assert model.default_help("l2_scale") == "[default: 0.0; 0.001 on dmfc_rsg]"
    assert model.default_help("cd_rate") == "[default: 0.3]"
    ci_enc = model.default_help("ci_enc_dim")
    assert "80 on mc_maze_large" in ci_enc and "dmfc_rsg" not in ci_enc and "mc_maze," not in ci_enc
    assert model.default_help("gen_dim") == "[default: 100]"  # the same on every dataset: none named


def test_a_controller_lag_of_the_whole_trial_is_refused():
    from nlbfab.errors import UserError
    model = MODELS["lfads"]
    assert model.init(SIZES, 0, ci_lag=SIZES.bins - 1)["ci_lag"] == SIZES.bins - 1
    with pytest.raises(UserError, match=r"--ci-lag 12: must be below the split's 12 observed bins"):
        model.init(SIZES, 0, ci_lag=SIZES.bins)
