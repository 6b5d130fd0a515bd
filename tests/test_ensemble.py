"""Ensembles: members batched equal members alone, each member keeps its own best and stop, the
submission is the mean of the chosen members' rates, and a killed ensemble resumes exactly."""
from __future__ import annotations

import dataclasses
import json
import math

import h5py
import numpy as np
import pytest
import torch
from lightning_fabric import Fabric
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nlbfab import cli
from nlbfab import train as loop
from nlbfab.data import load_split
from nlbfab.ensemble import greedy_selection, mean_logrates
from nlbfab.evaluation import predict
from nlbfab.models import MODELS, Sizes, lfads
from nlbfab.splits import get_split
from nlbfab.train import TrainConfig, train
from tests.conftest import homes_with, run_cli

SIZES = Sizes(heldin=6, heldout=3, bins=12, fwd_steps=4, mean_counts=torch.full((9,), 0.3))
FAST = dict(hparams={"hidden_size": 16}, batch_size=16, accelerator="cpu", log_every_n_epochs=100)


SETTINGS_OF = {"lfads": lfads.FIXED}  # entries of params that are not trained


LFADS_SIZES = {"ic_enc_dim": 8, "ci_enc_dim": 6, "con_dim": 8, "co_dim": 2, "ic_dim": 8, "gen_dim": 16, "fac_dim": 4}


def members_and_heldin(name: str, count: int):
    hparams = LFADS_SIZES if name == "lfads" else {}
    members = [{k: v.double().requires_grad_(not k.startswith(SETTINGS_OF.get(name, ())))
                for k, v in MODELS[name].init(SIZES, seed, **hparams).items()} for seed in range(count)]
    return members, torch.poisson(torch.full((5, 12, 6), 0.7)).double()


# batched (SAE, LFADS: its posterior means, as it samples in training) and one after another
@pytest.mark.parametrize("name, training", [("sae", True), ("sae", False), ("gru_readout", True),
                                            ("gru_readout", False), ("lfads", False)])
def test_members_together_give_each_member_alones_outputs_and_gradients(name, training):
    model = MODELS[name]
    members, heldin = members_and_heldin(name, 3)
    logrates, latents = model.apply_members(members, heldin, 4, dropout=0.0, training=training)
    alone = [model.apply(p, heldin, 4, dropout=0.0, training=training) for p in members]
    assert logrates.shape == (3, 5, 16, 9)
    torch.testing.assert_close(logrates, torch.stack([a[0] for a in alone]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(latents, torch.stack([a[1] for a in alone]), rtol=1e-10, atol=1e-10)
    weights = torch.rand_like(logrates)
    trained = [v for p in members for v in p.values() if v.requires_grad]
    together = torch.autograd.grad((logrates * weights).sum(), trained, allow_unused=True)  # LFADS's priors
    separate = torch.autograd.grad(sum((a[0] * w).sum() for a, w in zip(alone, weights)), trained, allow_unused=True)
    assert sum(g is not None for g in together) > len(trained) / 2
    for a, b in zip(together, separate):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_each_member_draws_its_own_dropout_masks():
    members, heldin = members_and_heldin("sae", 2)
    same = [members[0], {k: v.detach().clone() for k, v in members[0].items()}]
    logrates, _ = MODELS["sae"].apply_members(same, heldin, 4, dropout=0.5, training=True)
    assert not torch.equal(logrates[0], logrates[1])


def test_lfads_members_together_give_each_member_alones_training_loss_and_gradients(monkeypatch):
    # the draws depend only on the last axis (held-in unit, factor, ...), so every member sees
    # the same coordinated-dropout and posterior-sampling patterns batched and alone; within a
    # trial coordinated dropout hides some units and not others
    members, heldin = members_and_heldin("lfads", 3)
    target = torch.poisson(torch.full((5, 16, 9), 0.7)).double()

    def pattern(*shape, **kwargs):  # torch.rand((2, 3)) or torch.rand(2, 3)
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        return torch.linspace(0.05, 0.95, shape[-1], dtype=torch.float64).expand(*shape).clone()
    monkeypatch.setattr(torch, "rand", pattern)
    monkeypatch.setattr(torch, "randn", lambda *shape, **kwargs: pattern(*shape) * 2 - 1)
    monkeypatch.setattr(torch, "randn_like", lambda x: pattern(x.shape).to(x.dtype) * 2 - 1)
    model = MODELS["lfads"]
    for member in members:
        member["cd_rate"].fill_(0.5)
        member["kl_ic_scale"].fill_(0.1)
        member["kl_co_scale"].fill_(0.1)
        member["l2_scale"].fill_(0.1)
    losses, terms = model.training_loss_members(members, heldin, target, dropout=0.0, epoch=100)
    alone = [model.training_loss(p, heldin, target, dropout=0.0, epoch=100) for p in members]
    torch.testing.assert_close(losses, torch.stack([a[0] for a in alone]), rtol=1e-10, atol=0)
    for name in ("recon", "kl_ic", "kl_co", "l2"):
        torch.testing.assert_close(terms[name], torch.stack([a[1][name] for a in alone]), rtol=1e-10, atol=0)
        assert len(set(terms[name].tolist())) == 3  # each member's own
    trained = [v for p in members for v in p.values() if v.requires_grad]
    weights = torch.tensor([1.0, 2.5, 4.0], dtype=torch.float64)
    together = torch.autograd.grad((losses * weights).sum(), trained)
    separate = torch.autograd.grad(sum(a[0] * w for a, w in zip(alone, weights)), trained)
    for a, b in zip(together, separate):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_lfads_members_draw_their_own_masks_and_samples():
    members, heldin = members_and_heldin("lfads", 2)
    same = [members[0], {k: v.detach().clone() for k, v in members[0].items()}]
    target = torch.poisson(torch.full((5, 16, 9), 0.7)).double()
    losses, _ = MODELS["lfads"].training_loss_members(same, heldin, target, dropout=0.3, epoch=0)
    assert losses[0] != losses[1]


def test_a_members_gradient_is_that_of_its_own_loss():
    model = MODELS["sae"]
    members = [{k: v.double() for k, v in model.init(SIZES, seed).items()} for seed in range(2)]
    module = loop.ParamsModule(model, members)
    heldin = torch.poisson(torch.full((5, 12, 6), 0.7)).double()
    target = torch.poisson(torch.full((5, 16, 9), 0.7)).double()
    loss, _ = module(heldin, 4, target=target)
    loss.backward()
    alone = loop.ParamsModule(model, [members[1]])
    alone(heldin, 4, target=target)[0].backward()
    for name, parameter in alone.members[0].params.items():
        torch.testing.assert_close(module.members[1].params[name].grad, parameter.grad, rtol=1e-9, atol=1e-12)


def test_the_ensembles_rates_are_the_mean_of_its_members_rates():
    logrates = torch.randn(3, 4, 5)
    torch.testing.assert_close(mean_logrates(logrates).exp(), logrates.exp().mean(0))
    assert torch.equal(mean_logrates(logrates[:1]), logrates[0])


def test_greedy_selection_adds_the_member_that_helps_the_mean_most_while_one_helps():
    truth = np.array([1.0, 2.0, 3.0, 4.0])
    members = [truth + [0.3, -0.3, 0.3, -0.3], truth + [-0.2, 0.2, -0.2, 0.2], truth + 0.4, truth + 2.0]

    def score(rates):
        return -np.abs(rates - truth).sum()
    # the best alone is member 1 (-0.8 off); member 0 brings the mean closest (-0.2; member 2 would
    # give -0.8); a third would take the mean further off (member 2: -0.53), so none is added
    assert greedy_selection(members, score, 4) == [1, 0]
    assert greedy_selection(members, score, 2) == [1, 0]
    assert greedy_selection(members, score, 1) == [1]
    assert greedy_selection([truth + 0.1, truth + 2.0], score, 2) == [0]  # a weak member never joins


def test_a_stopped_member_is_frozen_while_the_others_train_on():
    config = TrainConfig(split="mc_rtt-20ms-val", patience=2, max_epochs=100)
    stopped = loop.Progress(epoch=5, best=0.3, best_epoch=2, stale=3, stop="no improvement for 2 epochs")
    decision = loop.member_decision(stopped, 0.9, 0.004, config)
    assert decision.lr == 0.0 and not decision.improved
    assert decision.progress == dataclasses.replace(stopped, epoch=6)
    training = loop.Progress(epoch=5, best=0.3, best_epoch=4, stale=0)
    assert loop.run_stop((stopped, training), config) is None
    both = (stopped, dataclasses.replace(training, epoch=100))
    assert loop.run_stop(both, config) == "all 2 members stopped (1: no improvement for 2 epochs; 1: max epochs)"
    assert loop.run_stop((stopped,), config) == "no improvement for 2 epochs"
    # a member's own stop lasts; --max-epochs is the run's, and a resumed run may raise it
    assert loop.run_stop((stopped, dataclasses.replace(training, epoch=100)),
                         dataclasses.replace(config, max_epochs=200)) is None


def test_keep_best_replaces_only_the_improved_members_weights():
    best = {"members.0.params.w": torch.zeros(2), "members.1.params.w": torch.zeros(2)}
    now = {"members.0.params.w": torch.ones(2), "members.1.params.w": torch.ones(2)}
    kept = loop.keep_best(best, now, [1])
    assert torch.equal(kept["members.0.params.w"], torch.zeros(2)) and torch.equal(kept["members.1.params.w"], now["members.1.params.w"])
    assert kept["members.1.params.w"] is not now["members.1.params.w"]  # a copy, not the live weights


def member_rates(run_dir, split, homes, config):
    """Each member's predictions from the run's best checkpoint."""
    fabric = Fabric(accelerator="cpu", devices=1)
    data = load_split(split, homes)
    state = loop.create_train_state(fabric, config, data)
    state.module.load_state_dict(torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=False)["model"])
    return data, [predict(loop.ensemble_forward(state.module, data.fwd_steps, [k]), data)
                  for k in range(config.ensemble)]


def test_a_two_member_run_submits_the_mean_of_its_members_rates(homes, prepared):
    config = TrainConfig(**FAST, split="mc_maze-20ms-val", run_tag="ens2", ensemble=2, max_epochs=5)
    summary = train(config, homes_with(), quiet=True)
    run_dir = homes["RUNS_HOME"] / "ens2" / "mc_maze-20ms-val"
    data, rates = member_rates(run_dir, get_split("mc_maze-20ms-val"), homes_with(), summary_config(run_dir))
    with h5py.File(summary["submission"]) as h5:
        for name in ("train_rates_heldin", "eval_rates_heldout", "eval_rates_heldout_forward"):
            np.testing.assert_allclose(h5[f"mc_maze_20/{name}"][()], (rates[0][name] + rates[1][name]) / 2, rtol=1e-5)
    members = summary["ensemble"]["members"]
    assert summary["ensemble"]["chosen"] == [0, 1] and [m["seed"] for m in members] == [0, 1]
    for member in members:  # each member's best weights are those of its own best epoch
        assert member["metrics"]["co-bps"] == pytest.approx(member["best_monitored"], rel=1e-4)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["ensemble"]["members"][1]["best_epoch"] == members[1]["best_epoch"]
    assert summary["metrics"]["co-bps"] == pytest.approx(summary["best_monitored"], rel=1e-4)
    scalars = set(EventAccumulator(str(run_dir)).Reload().Tags()["scalars"])
    assert {"monitored", "monitored/member_0", "monitored/member_1", "final/co-bps"} <= scalars


def summary_config(run_dir) -> TrainConfig:
    return TrainConfig(**json.loads((run_dir / "config.json").read_text()))


@pytest.mark.parametrize("top", [2, 3])
def test_top_members_chosen_on_val_and_reused_on_test(homes, prepared, top):
    options = dict(**FAST, run_tag=f"ens-top{top}", ensemble=3, ensemble_top=top, max_epochs=3)
    val = train(TrainConfig(**options, split="mc_rtt-20ms-val"), homes_with(), quiet=True)
    chosen = val["ensemble"]["chosen"]
    assert len(chosen) <= top and [m["chosen"] for m in val["ensemble"]["members"]] == [k in chosen for k in range(3)]
    bests = [m["best_monitored"] for m in val["ensemble"]["members"]]
    assert chosen[0] == int(np.argmax(bests))  # greedy starts from the best member, even when all may go in
    assert val["metrics"]["co-bps"] >= max(bests) - 1e-4  # and adds one only where the mean gains
    test = train(TrainConfig(**options, split="mc_rtt-20ms-test"), homes_with(), quiet=True)
    assert test["ensemble"]["chosen"] == chosen


def test_member_zero_of_an_ensemble_trains_as_the_single_model(homes, prepared):
    # without dropout nothing random differs: the same init, batches and per-member clipping
    options = dict(**FAST, split="mc_rtt-20ms-test", max_epochs=3, dropout=0.0, grad_clip=0.5)
    train(TrainConfig(**options, run_tag="single"), homes_with(), quiet=True)
    train(TrainConfig(**options, run_tag="pair", ensemble=2), homes_with(), quiet=True)

    def weights(tag):
        path = homes["RUNS_HOME"] / tag / "mc_rtt-20ms-test" / "checkpoints" / "last.ckpt"
        return torch.load(path, weights_only=False)["model"]
    single, pair = weights("single"), weights("pair")
    for key, value in single.items():
        torch.testing.assert_close(pair[key], value, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pair["members.1.params.readout_w"], single["members.0.params.readout_w"])


@pytest.mark.parametrize("phase", ["val", "test"])
def test_a_model_with_its_own_training_loss_trains_as_an_ensemble(homes, prepared, phase):
    # LFADS also trains on the eval trials' held-in spikes by default; on the test phase each
    # member monitors the held-in entries kept out of training
    hparams = {"ic_enc_dim": 8, "ci_enc_dim": 8, "con_dim": 8, "co_dim": 2, "ic_dim": 8, "gen_dim": 16, "fac_dim": 8}
    split = f"mc_rtt-20ms-{phase}"
    config = TrainConfig(**{**FAST, "hparams": hparams}, split=split, run_tag="ens-lfads", model="lfads",
                         ensemble=2, max_epochs=2)
    summary = train(config, homes_with(), quiet=True)
    bests = [m["best_monitored"] for m in summary["ensemble"]["members"]]
    assert len(bests) == 2 and all(math.isfinite(b) for b in bests) and bests[0] != bests[1]
    assert json.loads((homes["RUNS_HOME"] / "ens-lfads" / split / "config.json").read_text())["train_eval_heldin"]
    if phase == "val":
        assert math.isfinite(summary["metrics"]["co-bps"])


def test_ensemble_options_that_cannot_work_are_one_line(prepared):
    result = run_cli(cli.train, "--split", "mc_rtt-20ms-val", "--ensemble", "2", "--ensemble-top", "3")
    assert result.exit_code == 2 and result.output.strip() == "error: --ensemble-top 3: must be at most --ensemble (2)"
    result = run_cli(cli.train, "--split", "mc_rtt-20ms-val", "--ensemble", "0")
    assert result.exit_code == 2 and "--ensemble 0: must be >= 1" in result.output
    result = run_cli(cli.train, "--split", "mc_rtt-20ms-val", "--ensemble", "3", "--seed", str(2 ** 32 - 2))
    assert result.exit_code == 2 and "members are seeded up to SEED + 2" in result.output


def test_a_step_leaves_a_stopped_member_as_it_is_and_trains_the_others(homes, prepared):
    config = TrainConfig(**FAST, split="mc_rtt-20ms-val", ensemble=2)
    data = load_split(get_split(config.split), homes_with())
    state = loop.create_train_state(Fabric(accelerator="cpu", devices=1), config, data)
    state.members = (loop.Progress(epoch=3, stop="no improvement for 30 epochs"), loop.Progress(epoch=3))
    before = {k: v.clone() for k, v in state.module.state_dict().items()}
    assert loop.training_members(state) == [1]
    loop.train_step(state, (data.train_heldin[:16], data.train_recon[:16]), config)
    after = state.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("members.0."))
    assert all(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("members.1.params."))
