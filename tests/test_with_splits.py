"""``--with-splits``: one LFADS trained on several splits, each with its own read-in and read-out
(lfads-torch's multisession model): the read-ins and read-outs in the model's maths, the
options' checks, and training through the loop (the companions' read-outs train, an epoch
passes over every split, resume is bit-identical, only the run's own split is submitted)."""
import json
import math
from dataclasses import replace
from pathlib import Path

import h5py
import pytest
import torch

from nlbfab import cli
from nlbfab.errors import UserError
from nlbfab.models import MODELS, Sizes, lfads
from nlbfab.train_config import TrainConfig
from tests.conftest import homes_with, run_cli

SMALL = dict(ic_enc_dim=8, ci_enc_dim=8, con_dim=8, co_dim=2, ic_dim=8, gen_dim=16, fac_dim=4)
MAIN = Sizes(heldin=6, heldout=3, bins=12, fwd_steps=4, mean_counts=torch.full((9,), 0.3))
OTHER = Sizes(heldin=5, heldout=2, bins=10, fwd_steps=4, mean_counts=torch.full((7,), 0.2))
SPLIT, WITH = "mc_maze_small-20ms-val", "mc_maze_medium-20ms-val,mc_maze_large-20ms-val"


def test_every_split_gets_a_read_in_and_each_companion_a_read_out():
    alone = MODELS["lfads"].init(MAIN, 0, **SMALL)
    shared = MODELS["lfads"].init(replace(MAIN, companions=(OTHER,)), 0, readin_dim=7, **SMALL)
    assert not any(k.startswith("readin") for k in alone) and alone["ic_enc_fwd_w_ih"].shape[1] == MAIN.heldin
    assert shared["readin0_w"].shape == (7, MAIN.heldin) and shared["readin1_w"].shape == (7, OTHER.heldin)
    assert shared["ic_enc_fwd_w_ih"].shape[1] == 7 and shared["readout_w"].shape == (9, SMALL["fac_dim"])
    assert shared["readout1_w"].shape == (7, SMALL["fac_dim"])
    assert torch.allclose(shared["readout1_b"], torch.log(OTHER.mean_counts))
    heldin = torch.poisson(torch.full((3, OTHER.bins, OTHER.heldin), 0.5))
    logrates, factors = lfads.apply(shared, heldin, 4, session=1)
    assert logrates.shape == (3, OTHER.bins + 4, 7) and factors.shape == (3, OTHER.bins + 4, SMALL["fac_dim"])


def test_a_session_is_its_read_in_then_the_shared_model_then_its_read_out():
    shared = MODELS["lfads"].init(replace(MAIN, companions=(OTHER,)), 0, readin_dim=MAIN.heldin, **SMALL)
    heldin = torch.poisson(torch.full((3, OTHER.bins, OTHER.heldin), 0.5))
    logrates, factors = lfads.apply(shared, heldin, 4, session=1)
    # the same model without read-ins, given the read-in's output, with the companion's read-out
    plain = {k: v for k, v in shared.items() if not k.startswith(("readin", "readout1"))}
    plain |= {"readout_w": shared["readout1_w"], "readout_b": shared["readout1_b"]}
    read_in = heldin @ shared["readin1_w"].T + shared["readin1_b"]
    expected, expected_factors = lfads.apply(plain, read_in, 4)
    assert torch.allclose(logrates, expected, atol=1e-6) and torch.allclose(factors, expected_factors, atol=1e-6)
    # session 0 takes its own read-in and the model's read-out
    main_heldin = torch.poisson(torch.full((3, MAIN.bins, MAIN.heldin), 0.5))
    main, _ = lfads.apply(shared, main_heldin, 4)
    expected, _ = lfads.apply({**plain, "readout_w": shared["readout_w"], "readout_b": shared["readout_b"]},
                              main_heldin @ shared["readin0_w"].T + shared["readin0_b"], 4)
    assert torch.allclose(main, expected, atol=1e-6)
    loss, terms = lfads.training_loss(shared, heldin, torch.poisson(torch.full((3, OTHER.bins + 4, 7), 0.5)),
                                      dropout=0.1, epoch=0, session=1)
    assert math.isfinite(float(loss)) and set(terms) == {"recon", "kl_ic", "kl_co", "l2"}


def test_members_together_read_a_companion_through_each_members_own_read_in_and_read_out():
    members = [MODELS["lfads"].init(replace(MAIN, companions=(OTHER,)), seed, readin_dim=7, **SMALL)
               for seed in range(2)]
    heldin = torch.poisson(torch.full((3, OTHER.bins, OTHER.heldin), 0.5))
    logrates, factors = lfads.apply_members(members, heldin, 4, session=1)
    alone = [lfads.apply(p, heldin, 4, session=1) for p in members]
    assert logrates.shape == (2, 3, OTHER.bins + 4, 7) and not torch.allclose(logrates[0], logrates[1])
    torch.testing.assert_close(logrates, torch.stack([a[0] for a in alone]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(factors, torch.stack([a[1] for a in alone]), rtol=1e-5, atol=1e-6)


def test_a_companion_gives_an_epoch_as_many_batches_as_it_has_steps_from_whole_passes():
    from nlbfab.data import TrainingPool
    from nlbfab.train import Companion, companion_batches
    companion = Companion("c", TrainingPool(torch.zeros(10, 2, 1), torch.zeros(10, 3, 1)), batch_size=4)
    generator = torch.Generator().manual_seed(0)
    many = companion_batches(companion, 7, generator)  # passes of 3 batches (4, 4, 2): three passes, cut at 7
    assert [len(b) for b in many] == [4, 4, 2, 4, 4, 2, 4]
    for first in (0, 3):
        assert sorted(torch.cat(many[first:first + 3]).tolist()) == list(range(10))
    few = companion_batches(companion, 2, generator)
    assert len(few) == 2 and len(set(torch.cat(few).tolist())) == 8


@pytest.mark.parametrize("with_splits, message", [
    ("mc_maze_small-20ms-test", "mc_maze_small appears twice"),
    ("mc_maze_medium-20ms-val,mc_maze_medium-20ms-test", "mc_maze_medium appears twice"),
    ("mc_maze_medium-05ms-val", "5 ms bins, --split mc_maze_small-20ms-val 20 ms"),
    ("mc_maze_mediun-20ms-val", r"--with-splits: unknown split 'mc_maze_mediun-20ms-val': did you mean"),
])
def test_splits_that_share_trials_or_bin_otherwise_are_refused(with_splits, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(split=SPLIT, model="lfads", with_splits=with_splits)


def test_a_model_that_cannot_share_is_refused_before_anything_is_written(prepared, homes):
    result = run_cli(cli.train, "--split", SPLIT, "--model", "sae", "--with-splits", WITH, "--run-tag", "share-sae")
    assert result.exit_code == 2 and "model sae cannot share its dynamics across splits (lfads can)" in result.output
    assert not Path(homes["RUNS_HOME"], "share-sae", SPLIT).exists()


def test_an_option_of_shared_runs_alone_is_refused_by_a_run_and_a_search_without_companions(prepared, homes):
    from nlbfab.command import given_train_options
    result = run_cli(cli.train, "--split", SPLIT, "--model", "lfads", "--readin-dim", "8", "--run-tag", "readin-alone")
    assert result.exit_code == 2
    assert "error: --readin-dim acts only with --with-splits: add --with-splits or drop it" in result.output
    assert not Path(homes["RUNS_HOME"], "readin-alone").exists()
    with pytest.raises(UserError, match="--readin-dim acts only with --with-splits"):
        given_train_options(cli.train, SPLIT, ["--model", "lfads", "--readin-dim", "8"])
    assert given_train_options(cli.train, SPLIT, ["--model", "lfads", "--readin-dim", "8", "--with-splits", WITH])[
        "readin_dim"] == 8


def test_a_config_file_from_a_run_with_companions_serves_a_run_without_them():
    """A saved config.json (--config, --resume) holds every setting its run used: one for
    companions drops out where there are none; given on the command line it is refused."""
    from nlbfab.command import train_config
    saved = {"readin_dim": 8, "gen_dim": 16}
    assert train_config(SPLIT, {"model": "lfads", "config": saved}, []).hparams == {"gen_dim": 16}
    shared = train_config(SPLIT, {"model": "lfads", "config": saved, "with_splits": WITH}, [])
    assert shared.hparams == saved
    assert train_config(SPLIT, {"model": "lfads", "config": saved}, ["--readin-dim", "4"]).hparams == {
        "gen_dim": 16, "readin_dim": 4}  # given again: the run refuses it (above)


def test_a_run_without_companions_settles_no_option_that_acts_only_with_them():
    """What a run's config.json holds: the hyperparameters it used."""
    alone, shared = (MODELS["lfads"].settle({}, "mc_maze_small", with_splits=w) for w in (False, True))
    assert "readin_dim" not in alone and shared == alone | {"readin_dim": 40}
    assert MODELS["sae"].settle({}, with_splits=False) == MODELS["sae"].settle({})


def shared_run(tag, max_epochs, resume=False, **options):
    from nlbfab.train import train
    config = TrainConfig(split=SPLIT, model="lfads", hparams=SMALL, batch_size=16, accelerator="cpu",
                         max_epochs=max_epochs, log_every_n_epochs=2, run_tag=tag, with_splits=WITH, **options)
    return train(config, homes_with(), resume=resume, quiet=True)


def test_the_companions_train_with_the_model_and_only_its_own_split_is_submitted(prepared, homes):
    from nlbfab.data import load_split, with_eval_heldin
    from nlbfab.splits import get_split
    from nlbfab.train import sizes_of
    summary = shared_run("share-loop", 3)
    assert summary["split"] == SPLIT and math.isfinite(summary["metrics"]["co-bps"])
    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "config.json").read_text())["with_splits"] == WITH
    with h5py.File(run_dir.parent / "submission-val.h5") as h5:
        assert list(h5) == ["mc_maze_small_20"]
    assert sorted(p.name for p in run_dir.parent.iterdir() if p.is_dir()) == [SPLIT]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    # an epoch is a pass over the run's own pool, a batch of each companion at every step
    pool = with_eval_heldin(load_split(get_split(SPLIT), homes_with()), 0)[1]
    assert last["average"]["steps"] == 3 * math.ceil(len(pool.heldin) / 16)
    # the companions' read-outs were trained from their initial values
    data = [load_split(get_split(name), homes_with()) for name in [SPLIT, *WITH.split(",")]]
    initial = MODELS["lfads"].init(sizes_of(data[0], tuple(data[1:])), 0,
                                   **MODELS["lfads"].settle(SMALL, "mc_maze_small"))
    for k in (1, 2):
        trained = last["model"][f"members.0.params.readout{k}_w"]
        assert trained.shape == initial[f"readout{k}_w"].shape and not torch.equal(trained, initial[f"readout{k}_w"])


def test_train_test_heldin_adds_each_val_splits_test_trials_to_its_pool(prepared, homes, monkeypatch):
    from nlbfab import train as loop
    from nlbfab.data import load_split
    from nlbfab.splits import get_split
    real, pools = loop.training_pool, {}

    def recording(data, config, homes):
        data, pool = real(data, config, homes)
        pools[data.split.name] = pool.heldin.shape[0]
        return data, pool

    monkeypatch.setattr(loop, "training_pool", recording)
    shared_run("share-test-heldin", 1, train_test_heldin=True)
    trials = {name: sum(load_split(get_split(name.replace("val", phase)), homes_with()).eval_heldin.shape[0]
                        for phase in ("val", "test")) + load_split(get_split(name), homes_with()).train_heldin.shape[0]
              for name in [SPLIT, *WITH.split(",")]}  # train, eval (--train-eval-heldin, LFADS's default), test trials
    assert pools == trials


def test_a_resumed_run_with_companions_ends_with_the_same_weights(prepared, homes):
    whole = shared_run("share-whole", 4)
    shared_run("share-parts", 2)
    parts = shared_run("share-parts", 4, resume=True)
    a, b = (torch.load(f"{s['run_dir']}/checkpoints/last.ckpt", weights_only=False)["model"] for s in (whole, parts))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "members.0.params.readin2_w" in a


def test_ranks_agree_under_ddp_with_companions(prepared, tmp_path):
    import os
    import subprocess
    import sys
    script = Path(__file__).with_name("ddp_check.py")
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(prepared), "2", str(tmp_path), "lfads", json.dumps(SMALL),
                           "1", "mc_maze_large-20ms-val,mc_rtt-20ms-val"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}-of-2.pt") for r in (0, 1))
    for key in ("members.0.params.gen_w_hh", "members.0.params.readout2_w", "members.0.params.readin1_w"):
        assert not torch.equal(rank0["final"][key], rank0["initial"][key])  # it trained
    assert all(torch.equal(rank0["final"][k], rank1["final"][k]) for k in rank0["final"])


def test_nlbfab_all_shares_each_split_with_the_other_datasets_splits_of_its_bin_width_and_phase():
    from nlbfab.splits import get_split
    from nlbfab.sweep import shared_splits
    maze = ["mc_maze", "mc_maze_small", "mc_maze_large"]
    assert [s.name for s in shared_splits(get_split("mc_maze_small-20ms-test"), maze)] == [
        "mc_maze-20ms-test", "mc_maze_large-20ms-test"]
    assert [s.name for s in shared_splits(get_split("mc_maze-05ms-val"), maze)] == [
        "mc_maze_large-05ms-val", "mc_maze_small-05ms-val"]
    assert shared_splits(get_split("mc_rtt-20ms-val"), maze) == ()


@pytest.mark.parametrize("options, message", [
    (["--model", "lfads", "--share-datasets", "mc_maze_small"], "name two or more datasets"),
    (["--share-datasets", "mc_maze_small,mc_maze_medium"], "model sae cannot share its dynamics"),
    (["--model", "lfads", "--share-datasets", "mc_maze_small,mc_maze_medium", "--search", "2"],
     "--share-datasets with --search"),
    (["--model", "lfads", "--readin-dim", "8"], "--readin-dim acts only with --with-splits, and "
     "mc_maze_small-20ms-val would train alone: share its dataset with --share-datasets, or drop the option"),
    (["--model", "lfads", "--datasets", "mc_maze_small,mc_rtt", "--share-datasets", "mc_maze_small,mc_maze_medium",
      "--readin-dim", "8"], "and mc_rtt-20ms-val would train alone"),
])
def test_nlbfab_all_refuses_sharing_it_cannot_do(prepared, homes, options, message):
    result = run_cli(cli.sweep, "--datasets", "mc_maze_small", "--bins", "20", "--phases", "val", "--run-tag",
                     "share-never", *options)
    assert result.exit_code == 2 and message in result.output
    assert not Path(homes["RUNS_HOME"], "share-never").exists()


def test_nlbfab_all_trains_each_shared_split_with_the_others(prepared, homes):
    result = run_cli(cli.sweep, "--datasets", "mc_maze_small,mc_maze_medium", "--bins", "20", "--phases", "val",
                     "--model", "lfads", "--share-datasets", "mc_maze_small,mc_maze_medium", "--max-epochs", "1",
                     "--run-tag", "share-all", "--workers", "1", "--readin-dim", "8")
    assert result.exit_code == 0, result.output
    tag_dir = Path(homes["RUNS_HOME"], "share-all")
    for split, other in [("mc_maze_small-20ms-val", "mc_maze_medium-20ms-val"),
                         ("mc_maze_medium-20ms-val", "mc_maze_small-20ms-val")]:
        run_config = json.loads((tag_dir / split / "config.json").read_text())
        assert run_config["with_splits"] == other and run_config["hparams"]["readin_dim"] == 8
    with h5py.File(tag_dir / "submission-val.h5") as h5:
        assert sorted(h5) == ["mc_maze_medium_20", "mc_maze_small_20"]
