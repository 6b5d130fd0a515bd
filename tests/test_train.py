"""The Fabric loop: checkpoints, early stopping, the learning rate's decay on a plateau, NaN stop,
hooks in TensorBoard, the submission, resume after a kill, and a second model through the same loop."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nlbfab import train as loop
from nlbfab.errors import UserError
from nlbfab.scoring import score
from nlbfab.train import TrainConfig, train
from nlbfab.train_config import auto_batch_size, with_batch_size
from tests.conftest import homes_with

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(hparams={"hidden_size": 16}, batch_size=16, accelerator="cpu", log_every_n_epochs=3)


def run(homes, prepared, **options):
    config = TrainConfig(**{**FAST, **options})
    return train(config, homes_with(), quiet=True)


def test_the_epoch_line_shows_val_co_bps_or_the_test_phases_val_loss_with_the_best_so_far(homes, prepared, capsys):
    def epoch_lines(split, ensemble):
        config = TrainConfig(**{**FAST, "split": split, "run_tag": f"line{ensemble}", "max_epochs": 3,
                                "ensemble": ensemble, "log_every_n_epochs": 100})
        summary = train(config, homes_with())
        return summary, [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]

    summary, lines = epoch_lines("mc_maze-20ms-val", 1)
    assert [line[6:8] for line in lines] == [["val", "co-bps"]] * 3
    assert float(lines[-1][10]) == pytest.approx(summary["best_monitored"], abs=1e-4)  # "best B @ E"
    # the test phase monitors its val loss: shown as the loss, lower is better, never negative
    summary, lines = epoch_lines("mc_rtt-20ms-test", 1)
    val_losses = [float(line[5]) for line in lines]
    bests = [float(line[7]) for line in lines]
    assert [line[6] for line in lines] == ["best"] * 3 and bests == pytest.approx(np.minimum.accumulate(val_losses), abs=1e-4)
    assert bests[-1] == pytest.approx(-summary["best_monitored"], abs=1e-4) and min(bests) > 0
    summary, lines = epoch_lines("mc_rtt-20ms-test", 2)
    assert " ".join(lines[-1][6:11]) == "(mean of 2) members' best"
    low, high = map(float, lines[-1][11].split(".."))
    members = [-m["best_monitored"] for m in summary["ensemble"]["members"]]
    assert (low, high) == pytest.approx((min(members), max(members)), abs=1e-4) and low > 0


def test_a_run_writes_checkpoints_logs_and_a_scored_submission(homes, prepared):
    summary = run(homes, prepared, split="mc_maze-20ms-val", run_tag="basic", max_epochs=6)
    run_dir = homes["RUNS_HOME"] / "basic" / "mc_maze-20ms-val"
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert json.loads((run_dir / "config.json").read_text())["max_epochs"] == 6
    assert summary["epochs"] == 6 and summary["stop_reason"] == "max epochs"
    # the hook's last numbers are those of the submission file, scored as EvalAI does
    target = prepared / "mc_maze-20ms-val" / "eval_target.h5"
    on_file = score(target, Path(summary["submission"]), loop.get_split("mc_maze-20ms-val"))
    assert on_file == pytest.approx(summary["hook_metrics"], rel=1e-5)
    assert on_file["co-bps"] == pytest.approx(summary["best_monitored"], rel=1e-4)
    with h5py.File(summary["submission"]) as h5:
        assert set(h5["mc_maze_20"]) >= {"train_rates_heldin", "eval_rates_heldout", "eval_rates_heldout_forward"}

    events = EventAccumulator(str(run_dir)).Reload()  # tensorboard --logdir RUNS_HOME names it basic/mc_maze-20ms-val
    scalars = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "monitored", "lr", "nlb/co-bps", "nlb/vel R2", "nlb/psth R2"} <= scalars
    # no placeholder: the HPARAMS tab compares runs by their final scores
    assert "hp_metric" not in scalars and {"final/co-bps", "final/vel R2", "final/best epoch"} <= scalars
    assert events.Scalars("final/co-bps")[0].value == pytest.approx(on_file["co-bps"], rel=1e-6)
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(events.PluginTagToContent("hparams"))
    assert {"raster/trial_0", "latents/trajectories"} <= set(events.Tags()["images"])
    assert "inputs/inferred" not in events.Tags()["images"]  # the SAE infers no inputs
    assert len(events.Scalars("loss/train")) == 6


def test_early_stopping_ends_a_run_that_stopped_improving(homes, prepared):
    summary = run(homes, prepared, split="mc_rtt-20ms-test", run_tag="early", max_epochs=300, patience=3,
                  learning_rate=0.05)
    assert summary["stop_reason"] == "no improvement for 3 epochs"
    assert summary["epochs"] == summary["best_epoch"] + 4 < 300


def test_the_lr_decays_after_every_lr_patience_epochs_without_improvement():
    config = TrainConfig(split="mc_rtt-20ms-test", lr_decay=0.5, lr_patience=3)
    assert [loop.plateau_lr(1.0, stale, config) for stale in range(8)] == [1, 1, 1, 0.5, 1, 1, 0.5, 1]
    constant = dataclasses.replace(config, lr_decay=1.0)  # nlb-lightning's schedule
    assert {loop.plateau_lr(1.0, stale, constant) for stale in range(8)} == {1.0}


def test_after_epoch_keeps_the_best_counts_stale_epochs_and_says_when_to_stop():
    config = TrainConfig(split="mc_rtt-20ms-val", patience=5, lr_patience=2, lr_decay=0.5, min_lr=0.1,
                         learning_rate=1.0, max_epochs=100)
    progress, lr, decisions = loop.Progress(), 1.0, []
    for value in (0.1, 0.3, 0.2, 0.25, 0.3, 0.29, 0.4):
        decision = loop.after_epoch(progress, value, lr, config)
        decisions.append(decision)
        progress, lr = decision.progress, decision.lr
    assert [d.improved for d in decisions] == [True, True, False, False, False, False, True]
    assert [d.progress.stale for d in decisions] == [0, 0, 1, 2, 3, 4, 0]
    assert [d.lr for d in decisions] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]  # halved each 2 stale epochs
    assert progress == loop.Progress(epoch=7, best=0.4, best_epoch=6, stale=0) and not any(d.stop for d in decisions)
    stale = loop.Progress(epoch=7, best=0.4, best_epoch=6, stale=4)
    assert loop.after_epoch(stale, 0.1, 0.25, config).stop == "no improvement for 5 epochs"
    floor = dataclasses.replace(config, min_lr=0.2, patience=50)
    assert loop.after_epoch(loop.Progress(epoch=3, best=1, stale=1), 0.5, 0.25, floor).stop.startswith(
        "no improvement for 2 epochs at the lowest learning rate (0.25)")
    assert loop.after_epoch(loop.Progress(epoch=99, best=1.0), 0.5, 1.0, config).stop == "max epochs"
    assert loop.after_epoch(loop.Progress(), float("nan"), 1.0, config).improved is False


def test_a_run_halves_its_lr_on_each_plateau_and_stops_at_the_floor(homes, prepared):
    summary = run(homes, prepared, split="mc_rtt-20ms-test", run_tag="plateau", max_epochs=300, patience=100,
                  learning_rate=0.05, lr_decay=0.5, lr_patience=2, min_lr=0.01)
    assert summary["stop_reason"] == "no improvement for 2 epochs at the lowest learning rate (0.0125)"
    history = torch.load(homes["RUNS_HOME"] / "plateau" / "mc_rtt-20ms-test" / "checkpoints" / "last.ckpt",
                         weights_only=False)["history"]
    best, stale, lr = -float("inf"), 0, 0.05
    for epoch in history:
        assert epoch["lr"] == lr
        best, stale = (epoch["monitored"], 0) if epoch["monitored"] > best else (best, stale + 1)
        lr = lr / 2 if stale and stale % 2 == 0 else lr
    assert history[-1]["lr"] == 0.0125 and stale % 2 == 0  # halved twice, then stopped at the third plateau


def test_the_default_batch_makes_about_five_batches_an_epoch_between_16_and_64_trials():
    assert [auto_batch_size(n) for n in (10, 75, 100, 250, 272, 500, 1721)] == [16, 16, 20, 50, 55, 64, 64]
    assert with_batch_size(TrainConfig(split="mc_maze-20ms-val", batch_size=8), 1721).batch_size == 8


def test_a_run_without_a_batch_size_records_the_one_it_chose(homes, prepared):
    run(homes, prepared, split="area2_bump-20ms-val", run_tag="auto-batch", max_epochs=1, batch_size=None)
    with h5py.File(prepared / "area2_bump-20ms-val" / "train_input.h5") as h5:
        trials = h5["train_spikes_heldin"].shape[0]
    saved = json.loads((homes["RUNS_HOME"] / "auto-batch" / "area2_bump-20ms-val" / "config.json").read_text())
    assert saved["batch_size"] == auto_batch_size(trials)
    assert saved["average_decay"] == 0  # the SAE's default: no average
    assert saved["train_eval_heldin"] is False  # nor training on the eval trials


def test_a_nan_loss_stops_with_a_clear_message_and_keeps_the_best(homes, prepared, monkeypatch):
    real, calls = loop.poisson_nll, []

    def nan_from_the_fourth_epoch(logrates, spikes):
        if logrates.requires_grad:  # a training step, not validation
            calls.append(1)
        loss = real(logrates, spikes)
        return loss * float("nan") if len(calls) > 3 * 3 else loss  # 40 trials: 3 batches an epoch

    monkeypatch.setattr(loop, "poisson_nll", nan_from_the_fourth_epoch)
    with pytest.raises(UserError, match=r"training loss became nan at epoch 3: stopped before the update, the best checkpoint is kept"):
        run(homes, prepared, split="area2_bump-20ms-val", run_tag="nan", max_epochs=10)
    checkpoints = homes["RUNS_HOME"] / "nan" / "area2_bump-20ms-val" / "checkpoints"
    for name in ("best.ckpt", "last.ckpt"):
        state = torch.load(checkpoints / name, weights_only=False)
        assert all(torch.isfinite(v).all() for v in state["model"].values())
        assert state["members"][0]["epoch"] <= 3


def run_files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_run_that_fails_before_its_first_checkpoint_leaves_an_earlier_run_as_it_was(homes, prepared, monkeypatch):
    run(homes, prepared, split="area2_bump-20ms-val", run_tag="kept", max_epochs=2)
    run_dir = homes["RUNS_HOME"] / "kept" / "area2_bump-20ms-val"
    before = run_files(run_dir)
    real = loop.poisson_nll
    monkeypatch.setattr(loop, "poisson_nll", lambda logrates, spikes: real(logrates, spikes) * float("nan"))
    with pytest.raises(UserError, match=r"training loss became nan at epoch 0: stopped before the update, nothing "
                                        r"of this run was written \(an earlier run's files are as they were\)"):
        run(homes, prepared, split="area2_bump-20ms-val", run_tag="kept", max_epochs=3, seed=5)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(loop, "poisson_nll", real)
    monkeypatch.setattr(loop, "train_epoch", out_of_memory)
    with pytest.raises(UserError, match=r"out of memory training area2_bump-20ms-val .*choose smaller ones"):
        run(homes, prepared, split="area2_bump-20ms-val", run_tag="kept", max_epochs=3, seed=6)
    new_events = [name for name in run_files(run_dir) if name not in before]
    assert all(name.startswith("events.out.tfevents") for name in new_events)  # the failed runs' empty logs
    assert {name: data for name, data in run_files(run_dir).items() if name in before} == before


def test_a_resume_its_checkpoint_refuses_leaves_the_run_config_as_it_was(homes, prepared):
    run(homes, prepared, split="mc_rtt-20ms-test", run_tag="refused", max_epochs=1)
    config = homes["RUNS_HOME"] / "refused" / "mc_rtt-20ms-test" / "config.json"
    before = config.read_bytes()
    other = TrainConfig(**{**FAST, "split": "mc_rtt-20ms-test", "run_tag": "refused", "max_epochs": 2,
                           "model": "gru_readout"})
    with pytest.raises(UserError, match="cannot resume from .*from another model"):
        train(other, homes_with(), resume=True, quiet=True)
    assert config.read_bytes() == before


def test_a_resume_with_other_sizes_says_which_and_how_not_that_the_checkpoint_is_damaged(homes, prepared):
    run(homes, prepared, split="mc_rtt-20ms-test", run_tag="resized", max_epochs=1)
    bigger = TrainConfig(**{**FAST, "split": "mc_rtt-20ms-test", "run_tag": "resized", "max_epochs": 2,
                            "hparams": {"hidden_size": 32}})
    with pytest.raises(UserError, match=r"cannot resume from .*last.ckpt: its weights are from another model or sizes "
                                        r"than this run's \(size mismatch for .*\): resume with the run's own"):
        train(bigger, homes_with(), resume=True, quiet=True)


def test_a_caller_passes_its_own_hooks(homes, prepared):
    seen = []

    def count_trials(logger, data, predictions, epoch):
        seen.append((epoch, predictions["eval_rates_heldout"].shape[0]))
        return {"my metric": 1.5}

    summary = train(TrainConfig(split="mc_rtt-20ms-test", run_tag="hooks", max_epochs=4, **{**FAST, "log_every_n_epochs": 2}),
                    homes_with(), hooks=(count_trials,), quiet=True)
    assert seen == [(1, 12), (3, 12), (4, 12)]  # every 2 epochs, then on the submitted model, past the last epoch (3)
    assert summary["epochs"] == 4
    assert summary["hook_metrics"] == {"my metric": 1.5}


def test_a_caller_sees_every_epochs_record(homes, prepared):
    records = []
    summary = train(TrainConfig(split="mc_rtt-20ms-val", run_tag="on-epoch", max_epochs=3, **FAST), homes_with(),
                    quiet=True, on_epoch=records.append)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert max(r["monitored"] for r in records) == pytest.approx(summary["best_monitored"], rel=1e-6)


def test_a_second_model_trains_through_the_same_loop(homes, prepared):
    summary = run(homes, prepared, split="mc_maze-20ms-val", run_tag="byom", model="gru_readout", max_epochs=4)
    assert summary["model"] == "gru_readout" and "co-bps" in summary["metrics"]
    with h5py.File(summary["submission"]) as h5:
        assert h5["mc_maze_20/eval_rates_heldout"].shape == (16, 35, 4)


def recorded_batches(monkeypatch) -> list:
    """The list every ``(heldin, target)`` batch the loop trains on is appended to, from now on."""
    real, batches = loop.train_step, []

    def recording(state, batch, config, companions=()):
        batches.append(batch)
        return real(state, batch, config, companions)

    monkeypatch.setattr(loop, "train_step", recording)
    return batches


def test_train_eval_heldin_draws_batches_from_the_eval_trials_too(homes, prepared, monkeypatch):
    batches = recorded_batches(monkeypatch)
    records = []
    summary = train(TrainConfig(split="mc_maze-20ms-val", run_tag="eval-heldin", train_eval_heldin=True, max_epochs=2,
                                **FAST), homes_with(), quiet=True, on_epoch=records.append)
    heldin = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    assert heldin.shape[0] == 2 * (40 + 16)  # two epochs of the 40 train and 16 eval trials
    unknown = torch.isnan(targets).flatten(1).any(1)
    assert int(unknown.sum()) == 2 * 16 and torch.isnan(targets[unknown][:, 35:]).all()
    assert np.isfinite(summary["metrics"]["co-bps"]) and all(np.isfinite(r["train_loss"]) for r in records)
    with h5py.File(summary["submission"]) as h5:  # the submission's train trials are the split's
        assert h5["mc_maze_20/train_rates_heldin"].shape[0] == 40


def test_train_test_heldin_draws_batches_from_the_test_files_trials_too(homes, prepared, monkeypatch):
    batches = recorded_batches(monkeypatch)
    summary = train(TrainConfig(split="mc_maze-20ms-val", run_tag="test-heldin", train_test_heldin=True, max_epochs=2,
                                **FAST), homes_with(), quiet=True)
    with h5py.File(prepared / "mc_maze-20ms-test" / "eval_input.h5") as h5:
        test = torch.as_tensor(h5["eval_spikes_heldin"][()], dtype=torch.float32)
    heldin = torch.cat([b[0] for b in batches])
    unknown = torch.isnan(torch.cat([b[1] for b in batches])).flatten(1).any(1)
    assert heldin.shape[0] == 2 * (40 + 12)  # two epochs of the 40 train and 12 test trials, no eval trials
    assert int(unknown.sum()) == 2 * 12 and torch.equal(heldin[unknown].sum(0), 2 * test.sum(0))
    assert json.loads((homes["RUNS_HOME"] / "test-heldin" / "mc_maze-20ms-val" / "config.json").read_text())[
        "train_test_heldin"] is True
    assert np.isfinite(summary["metrics"]["co-bps"])


def test_train_test_heldin_adds_nothing_on_the_test_phase_whose_test_trials_are_the_eval_trials(homes, prepared,
                                                                                                 monkeypatch):
    batches, targets = recorded_batches(monkeypatch), []
    for tag, flag in (("test-phase-plain", False), ("test-phase-test-heldin", True)):
        # as a search's test phase builds it from a val trial's config.json: the eval trials' training settled off
        train(TrainConfig(split="mc_rtt-20ms-test", run_tag=tag, train_test_heldin=flag, train_eval_heldin=False,
                          max_epochs=1, **FAST), homes_with(), quiet=True)
        targets.append(torch.cat([b[1] for b in batches]))
        batches.clear()
    plain, flagged = targets
    assert torch.equal(flagged, plain) and not torch.isnan(flagged).any()  # the same train trials' batches, both times


def test_train_eval_heldin_on_the_test_phase_monitors_entries_it_never_trains(homes, prepared):
    small = {"ic_enc_dim": 8, "ci_enc_dim": 8, "con_dim": 8, "ic_dim": 8, "gen_dim": 16, "fac_dim": 4}
    losses = {}
    for tag, flag in (("eval-heldin", True), ("plain", False)):
        records = []
        train(TrainConfig(split="mc_rtt-20ms-test", run_tag=tag, model="lfads", train_eval_heldin=flag, max_epochs=3,
                          **{**FAST, "hparams": small}), homes_with(), quiet=True, on_epoch=records.append)
        losses[tag] = [r["val_loss"] for r in records]
    assert np.isfinite(losses["eval-heldin"]).all() and losses["eval-heldin"] != losses["plain"]
    assert json.loads((homes["RUNS_HOME"] / "eval-heldin" / "mc_rtt-20ms-test" / "config.json").read_text())[
        "train_eval_heldin"] is True


def test_train_eval_heldin_takes_the_models_default_unless_given_either_way(homes, prepared):
    from nlbfab import cli
    from tests.conftest import run_cli
    small = ["--ic-enc-dim", "8", "--ci-enc-dim", "8", "--con-dim", "8", "--ic-dim", "8", "--gen-dim", "16",
             "--fac-dim", "4"]
    for tag, given, expected in (("lfads-default", [], True), ("lfads-off", ["--no-train-eval-heldin"], False)):
        result = run_cli(cli.train, "--split", "mc_rtt-20ms-val", "--model", "lfads", "--max-epochs", "1", "--quiet",
                         "--run-tag", tag, *given, *small)
        assert result.exit_code == 0, result.output
        config = json.loads((homes["RUNS_HOME"] / tag / "mc_rtt-20ms-val" / "config.json").read_text())
        assert config["train_eval_heldin"] is expected


def test_resume_without_a_checkpoint_says_so(homes, prepared):
    with pytest.raises(UserError, match="nothing to resume"):
        train(TrainConfig(split="mc_rtt-20ms-val", run_tag="fresh", **FAST), homes_with(), resume=True, quiet=True)


def test_resuming_from_a_damaged_checkpoint_is_one_line(homes, prepared):
    run(homes, prepared, split="mc_rtt-20ms-test", run_tag="damaged-ckpt", max_epochs=1)
    last = homes_with().run_dir("damaged-ckpt", loop.get_split("mc_rtt-20ms-test")) / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    resumed = TrainConfig(**{**FAST, "split": "mc_rtt-20ms-test", "run_tag": "damaged-ckpt", "max_epochs": 2})
    with pytest.raises(UserError, match=r"cannot resume from .*last.ckpt: it is damaged .*drop --resume"):
        train(resumed, homes_with(), resume=True, quiet=True)
    other = dataclasses.replace(resumed, model="gru_readout")
    run(homes, prepared, split="mc_rtt-20ms-test", run_tag="damaged-ckpt", max_epochs=1)
    with pytest.raises(UserError, match="cannot resume from .*from another model"):
        train(other, homes_with(), resume=True, quiet=True)


def cli_train(homes, *args):
    env = {**os.environ, **{k: str(v) for k, v in homes.items()}, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([str(ROOT / "bin" / "nlbfab-train"), "--split", "dmfc_rsg-20ms-val", "--quiet",
                             "--accelerator", "cpu", "--hidden-size", "16", "--batch-size", "8",
                             "--log-every-n-epochs", "1000", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def last_epoch(path: Path) -> int:
    try:
        return torch.load(path, weights_only=False)["members"][0]["epoch"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


@pytest.mark.parametrize("every, written", [(0, [0, 1, 2, 3, 4]), (3600, [0, 4])])
def test_checkpoints_are_written_after_the_first_epoch_then_at_most_every_n_seconds_and_at_the_stop(
        homes, prepared, monkeypatch, every, written):
    real, epochs = loop.save_checkpoints, []

    def record(state, run_, improved):
        epochs.append(state.epoch - 1)
        real(state, run_, improved)

    monkeypatch.setattr(loop, "save_checkpoints", record)
    run(homes, prepared, split="mc_rtt-20ms-test", run_tag=f"every{every}", max_epochs=5, checkpoint_every=every)
    assert epochs == written
    last = torch.load(homes["RUNS_HOME"] / f"every{every}" / "mc_rtt-20ms-test" / "checkpoints" / "last.ckpt",
                      weights_only=False)
    assert last["members"][0]["epoch"] == 5 and len(last["history"]) == 5


@pytest.mark.parametrize("members, average", [("1", "0"), ("2", "0"), ("1", "0.9")])
def test_a_killed_run_resumed_ends_with_the_same_weights(homes, prepared, members, average):
    # a high lr with --lr-patience 1 lowers the lr in the first epochs, so that the run is killed
    # after a decay and resume must carry the lowered lr (no floor: all 12 epochs run)
    schedule = ("--max-epochs", "12", "--learning-rate", "0.05", "--lr-patience", "1", "--min-lr", "0",
                "--ensemble", members, "--checkpoint-every", "0", "--average-decay", average)
    name = f"{members}-{average}"
    whole = cli_train(homes, "--run-tag", f"whole{name}", *schedule)
    assert whole.wait(timeout=300) == 0, whole.stdout.read()

    killed = cli_train(homes, "--run-tag", f"killed{name}", *schedule)
    last = homes["RUNS_HOME"] / f"killed{name}" / "dmfc_rsg-20ms-val" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while last_epoch(last) < 4 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert 4 <= last_epoch(last) < 12  # really stopped part-way
    resumed = cli_train(homes, "--run-tag", f"killed{name}", *schedule, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()

    def checkpoint(tag):
        return torch.load(homes["RUNS_HOME"] / tag / "dmfc_rsg-20ms-val" / "checkpoints" / "last.ckpt", weights_only=False)
    a, b = checkpoint(f"whole{name}"), checkpoint(f"killed{name}")
    assert [p["epoch"] for p in a["members"]] == [p["epoch"] for p in b["members"]] == [12] * int(members)
    assert a["members"] == b["members"]
    assert all(torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["best"][k], b["best"][k]) for k in a["model"])
    if average != "0":
        assert a["average"]["steps"] == b["average"]["steps"] > 0
        assert all(torch.equal(a["average"]["weights"][k], b["average"]["weights"][k]) for k in a["model"])
    lrs = [epoch["lr"] for epoch in a["history"]]
    assert lrs == [epoch["lr"] for epoch in b["history"]]
    assert lrs[4] < lrs[0]  # lowered before the earliest kill


def test_the_weights_average_forgets_the_initial_weights_at_first_then_decays_at_its_rate():
    average = loop.WeightAverage(0.2, {"w": torch.tensor([0.0])})
    for value in (1.0, 2.0, 3.0):
        average.update({"w": torch.tensor([value])})
    # decays min(0.2, (1 + t) / (10 + t)): 0.1, 2/11, then 0.2 (not 3/12)
    first = 0.9 * 1.0
    second = 2 / 11 * first + 9 / 11 * 2.0
    assert average.steps == 3 and float(average.weights["w"]) == pytest.approx(0.2 * second + 0.8 * 3.0)


def test_a_run_with_a_weights_average_validates_keeps_and_submits_the_average(homes, prepared):
    summary = run(homes, prepared, split="mc_maze-20ms-val", run_tag="average", max_epochs=3, learning_rate=0.02,
                  average_decay=0.9, checkpoint_every=0)
    last = torch.load(homes["RUNS_HOME"] / "average" / "mc_maze-20ms-val" / "checkpoints" / "last.ckpt",
                      weights_only=False)
    averaged, trained = last["average"]["weights"], last["model"]
    assert last["average"]["steps"] == 3 * len(range(0, 36, 16))  # 3 epochs of 36 train trials in batches of 16
    # training goes on from the weights as trained; validation saw the average, best at the last epoch
    assert any(not torch.equal(averaged[k], trained[k]) for k in trained)
    assert summary["best_epoch"] == 2
    assert all(torch.equal(last["best"][k], averaged[k]) for k in trained)
    assert summary["best_monitored"] == pytest.approx(last["history"][-1]["monitored"], rel=1e-6)
    assert summary["metrics"]["co-bps"] == pytest.approx(summary["best_monitored"], rel=1e-4)


def test_save_latents_writes_the_submitted_models_latents_of_every_trial(homes, prepared):
    from benchmarks.inputs import best_params
    from nlbfab.data import load_split
    from nlbfab.models import get_model
    split = loop.get_split("mc_maze-20ms-val")
    run(homes, prepared, split=split.name, run_tag="latents", max_epochs=2, save_latents=True)
    run_dir = homes["RUNS_HOME"] / "latents" / split.name
    data = load_split(split, homes_with())
    name, params = best_params(run_dir)
    with h5py.File(run_dir / "latents.h5") as h5, torch.no_grad():
        assert set(h5) == {"train_latents", "eval_latents"}  # the SAE infers no inputs
        assert dict(h5.attrs) == {"split": split.name, "model": "sae", "seed": 0}
        for prefix, heldin in (("train", data.train_heldin), ("eval", data.eval_heldin)):
            _, latents = get_model(name).apply(params, heldin, data.fwd_steps)
            assert h5[f"{prefix}_latents"].shape == (len(heldin), data.bins + data.fwd_steps, 16)
            np.testing.assert_allclose(h5[f"{prefix}_latents"][()], latents.numpy(), rtol=1e-5, atol=1e-6)
    run(homes, prepared, split=split.name, run_tag="latents", max_epochs=1)  # the same run again, no latents asked
    assert not (run_dir / "latents.h5").exists()  # none left over from the run it replaced


def test_save_latents_is_a_flag_of_the_command_line(homes, prepared):
    from nlbfab import cli
    from tests.conftest import run_cli
    result = run_cli(cli.train, "--split", "mc_maze-20ms-val", "--max-epochs", "1", "--quiet", "--hidden-size", "16",
                     "--run-tag", "latents-cli", "--save-latents")
    assert result.exit_code == 0, result.output
    run_dir = homes["RUNS_HOME"] / "latents-cli" / "mc_maze-20ms-val"
    assert (run_dir / "latents.h5").exists() and json.loads((run_dir / "config.json").read_text())["save_latents"]


@pytest.mark.parametrize("precision", ["bf16-mixed"])  # 16-mixed needs a GPU: benchmarks/gpu_check.py
def test_mixed_precision_runs_and_learns(homes, prepared, precision):
    summary = run(homes, prepared, split="mc_maze-20ms-val", run_tag=f"amp-{precision}", precision=precision,
                  max_epochs=8, learning_rate=0.02)
    history = json.loads((homes["RUNS_HOME"] / f"amp-{precision}" / "mc_maze-20ms-val" / "metrics.json").read_text())
    assert summary["best_monitored"] > 0 and history["epochs"] == 8
    state = torch.load(homes["RUNS_HOME"] / f"amp-{precision}" / "mc_maze-20ms-val" / "checkpoints" / "last.ckpt",
                       weights_only=False)
    losses = [h["train_loss"] for h in state["history"]]
    assert losses[-1] < losses[0]
    assert all(v.dtype == torch.float32 for v in state["model"].values())  # mixed, not half weights


def constant_init(sizes, seed, scale):
    return {"log_rate": torch.log(sizes.mean_counts.clamp_min(1e-4)) * scale}


def constant_apply(params, heldin, fwd_steps, *, dropout=0.0, training=False):
    """Every trial and bin at one learned rate per neuron; latents: the rates."""
    shape = (heldin.shape[0], heldin.shape[1] + fwd_steps, params["log_rate"].shape[0])
    logrates = params["log_rate"].expand(shape)
    return logrates, logrates.exp()


def test_a_model_with_a_hyperparameter_of_its_own_trains_from_the_command_line(prepared, monkeypatch):
    from types import SimpleNamespace

    from nlbfab import cli, models
    from nlbfab.train_config import Hyperparameter, Valid
    from tests.conftest import run_cli
    module = SimpleNamespace(init=constant_init, apply=constant_apply,
                             HPARAMS={"scale": Hyperparameter(1.0, "Start at this multiple of the log mean rate.",
                                                              Valid(low=0, low_open=True))})
    monkeypatch.setitem(models.MODELS, "constant", models.Model("constant", module))
    args = ["--split", "mc_rtt-20ms-val", "--model", "constant", "--accelerator", "cpu", "--max-epochs", "2",
            "--run-tag", "own-hparam", "--quiet"]
    result = run_cli(cli.train, *args, "--scale", "0.5")
    assert result.exit_code == 0, result.output
    saved = json.loads((homes_with().run_dir("own-hparam", loop.get_split("mc_rtt-20ms-val")) / "config.json").read_text())
    assert saved["model"] == "constant" and saved["hparams"] == {"scale": 0.5}
    bad = run_cli(cli.train, *args, "--scale", "0")
    assert bad.exit_code == 2 and bad.output.startswith("error: --scale 0.0: must be > 0")
    other = run_cli(cli.train, *args, "--hidden-size", "8")
    assert other.exit_code == 2 and other.output.startswith("error: no such option --hidden-size")
    assert "model constant's hyperparameters (--scale)" in other.output


def test_a_model_from_the_users_own_package_trains_by_its_module_name(prepared, tmp_path, monkeypatch):
    package = tmp_path / "my_lab"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "flat.py").write_text(
        "from nlbfab.train_config import Hyperparameter, Valid\n"
        "from tests.test_train import constant_apply as apply, constant_init\n"
        "HPARAMS = {'scale': Hyperparameter(1.0, 'a multiple of the log mean rate', Valid(low=0, low_open=True))}\n"
        "def init(sizes, seed, scale):\n    return constant_init(sizes, seed, scale)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    summary = run(None, prepared, split="mc_rtt-20ms-val", run_tag="own-package", model="my_lab.flat",
                  hparams={"scale": 0.9}, max_epochs=2)
    assert summary["model"] == "my_lab.flat" and "co-bps" in summary["metrics"]
    with pytest.raises(UserError, match="unknown model 'my_lab.nothing'"):
        run(None, prepared, split="mc_rtt-20ms-val", run_tag="own-package", model="my_lab.nothing")


def test_resume_takes_the_settings_the_run_started_with(homes, prepared):
    from nlbfab import cli
    from tests.conftest import run_cli
    start = ["--split", "mc_rtt-20ms-val", "--run-tag", "resumed-settings", "--accelerator", "cpu", "--quiet"]
    first = run_cli(cli.train, *start, "--hidden-size", "16", "--batch-size", "8", "--learning-rate", "0.01",
                    "--max-epochs", "2")
    assert first.exit_code == 0, first.output
    resumed = run_cli(cli.train, *start, "--max-epochs", "3", "--resume")  # sizes and schedule not given again
    assert resumed.exit_code == 0, resumed.output
    run_dir = homes["RUNS_HOME"] / "resumed-settings" / "mc_rtt-20ms-val"
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["batch_size"], saved["hparams"]["hidden_size"], saved["learning_rate"], saved["max_epochs"]) == \
        (8, 16, 0.01, 3)
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 3


@pytest.mark.parametrize("precision, fused", [("32-true", True), ("bf16-mixed", True), ("16-mixed", False)])
def test_adamw_is_fused_but_where_16_mixed_must_clip_gradients_before_its_step(precision, fused):
    """A fused AdamW unscales 16-mixed's gradients inside its step, which Fabric's gradient
    clipping refuses (its own test of the optimizer, ``_optimizer_handles_unscaling``); the
    first GPU run of nlbfab-train --precision 16-mixed stopped on it."""
    from lightning_fabric.plugins.precision.amp import _optimizer_handles_unscaling
    groups = [{"params": [torch.nn.Parameter(torch.zeros(3))]}, {"params": [torch.nn.Parameter(torch.zeros(2))]}]
    optimizer = loop.adamw(groups, TrainConfig(split="mc_maze_small-20ms-val", precision=precision))
    assert optimizer.defaults["fused"] is fused and _optimizer_handles_unscaling(optimizer) is fused
    assert len(optimizer.param_groups) == 2
