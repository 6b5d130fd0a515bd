"""nlbfab-prep writes all 28 splits with the keys and shapes of the benchmark, atomically."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from nlbfab import cli, prep
from nlbfab.layout import PREP_MARKER, TRAIN_WINDOW_TARGET
from tests.conftest import homes_with
from nlbfab.splits import ALL_SPLITS, DATASETS, get_split
from nlbfab.synth import counts
from tests.conftest import run_cli


def read_h5(path):
    with h5py.File(path, "r") as h5:
        return {k: (read_group(h5[k]) if isinstance(h5[k], h5py.Group) else h5[k][()]) for k in h5}


def read_group(group):
    return {k: group[k][()] for k in group}


def test_all_28_split_folders_exist(prepared):
    assert sorted(p.name for p in prepared.iterdir() if not p.name.startswith(".")) == sorted(
        s.name for s in ALL_SPLITS)


@pytest.mark.parametrize("split", ALL_SPLITS, ids=str)
def test_keys_and_shapes_follow_the_dataset(prepared, split):
    n = counts(split.dataset, "tiny")
    folder = prepared / split.name
    train_trials = n.train + (n.val if split.phase == "test" else 0)
    eval_trials = n.val if split.phase == "val" else n.test
    bins, fwd = split.bins, split.forward_bins

    train = read_h5(folder / "train_input.h5")
    assert train["train_spikes_heldin"].shape == (train_trials, bins, n.heldin)
    assert train["train_spikes_heldout"].shape == (train_trials, bins, n.heldout)
    assert train["train_spikes_heldin_forward"].shape == (train_trials, fwd, n.heldin)
    assert train["train_spikes_heldout_forward"].shape == (train_trials, fwd, n.heldout)
    behavior = train["train_behavior"]
    if split.dataset.name == "dmfc_rsg":
        assert behavior.shape == (train_trials, 5)  # is_eye, theta, is_short, ts, tp
    else:
        assert behavior.shape == (train_trials, bins, 2) and not np.isnan(behavior).all()

    evaluation = read_h5(folder / "eval_input.h5")
    assert evaluation["eval_spikes_heldin"].shape == (eval_trials, bins, n.heldin)
    assert ("eval_spikes_heldout" in evaluation) == (split.phase == "val")

    if split.phase == "test":
        assert not (folder / "eval_target.h5").exists()
        return
    target = read_h5(folder / "eval_target.h5")
    assert list(target) == [split.group]
    group = target[split.group]
    assert group["eval_spikes_heldout"].shape == (eval_trials, bins, n.heldout)
    assert group["eval_spikes_heldin_forward"].shape == (eval_trials, fwd, n.heldin)
    has_psth = split.dataset.name != "mc_rtt"
    assert ("psth" in group) == has_psth
    if has_psth:
        assert group["psth"].shape[1:] == (bins, n.heldin + n.heldout)
    if split.dataset.name == "area2_bump":
        assert group["eval_decode_mask"].shape == (eval_trials, 2)


def test_dmfc_keeps_the_official_target_and_a_nan_free_one(prepared):
    folder = prepared / "dmfc_rsg-20ms-val"
    official = read_h5(folder / "eval_target.h5")["dmfc_rsg_20"]
    train_window = read_h5(folder / TRAIN_WINDOW_TARGET)["dmfc_rsg_20"]
    assert np.isnan(official["eval_spikes_heldout"]).any()  # set..go, front-padded: EvalAI's
    assert not np.isnan(train_window["eval_spikes_heldout"]).any()
    assert "eval_jitter" in official


def test_up_to_date_splits_are_skipped_and_force_redoes_them(prepared):
    marker = prepared / "mc_rtt-20ms-val" / PREP_MARKER
    before = marker.stat().st_mtime_ns
    result = run_cli(cli.prep, "--split", "mc_rtt-20ms-val")
    assert result.exit_code == 0 and "up to date, skipped" in result.output
    assert marker.stat().st_mtime_ns == before
    result = run_cli(cli.prep, "--split", "mc_rtt-20ms-val", "--force")
    assert result.exit_code == 0 and "written" in result.output
    assert marker.stat().st_mtime_ns != before
    assert json.loads(marker.read_text())["group"] == "mc_rtt_20"


def test_an_interrupted_run_leaves_the_previous_split_intact(prepared, monkeypatch, synthetic):
    split = get_split("area2_bump-20ms-val")
    folder = prepared / split.name
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    writes = []

    def crash_after_one_file(data, path, overwrite=False):
        writes.append(path)
        if len(writes) == 2:
            raise KeyboardInterrupt
        return original(data, path, overwrite=overwrite)

    original = prep.save_to_h5
    monkeypatch.setattr(prep, "save_to_h5", crash_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_dataset(split.dataset, [split], homes_with(data=synthetic, prep=prepared), force=True,
                             report=lambda line: None)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert prep.is_up_to_date(split, homes_with(data=synthetic, prep=prepared))


def test_an_interrupted_first_run_leaves_no_split_that_looks_done(synthetic, tmp_path, monkeypatch):
    split = get_split("mc_maze_small-20ms-test")
    monkeypatch.setattr(prep, "save_to_h5", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_dataset(split.dataset, [split], homes_with(data=synthetic, prep=tmp_path), report=lambda line: None)
    assert not (tmp_path / split.name).exists()
    assert not prep.is_up_to_date(split, homes_with(data=synthetic, prep=tmp_path))


def test_changed_nwb_files_make_a_split_stale(prepared, synthetic):
    split = get_split("mc_maze_medium-05ms-test")
    assert prep.is_up_to_date(split, homes_with(data=synthetic, prep=prepared))
    marker = prepared / split.name / PREP_MARKER
    made = json.loads(marker.read_text())
    made["sources"][0]["bytes"] += 1
    marker.write_text(json.dumps(made))
    assert not prep.is_up_to_date(split, homes_with(data=synthetic, prep=prepared))


def test_the_last_trials_behaviour_is_present_and_right(prepared, synthetic):
    """Trial-only behaviour: the last train trial's hand velocity matches the truth readout."""
    from nlbfab.oracle import read_truth
    from nlbfab.layout import TRUTH_FILE, dataset_dir
    split = get_split("mc_maze-20ms-test")  # trains on train+val: its last trial is the file's last
    behavior = read_h5(prepared / split.name / "train_input.h5")["train_behavior"]
    assert not np.isnan(behavior[-1]).any()
    truth, files = read_truth(dataset_dir(synthetic, DATASETS["mc_maze"]) / TRUTH_FILE)
    from nlbfab.nwb import load_dataset
    trials = load_dataset(dataset_dir(synthetic, DATASETS["mc_maze"])).trial_info
    last = trials[trials["split"].isin(["train", "val"])].iloc[-1]
    train_start = trials[trials["split"] != "test"]["start_time"].min()
    move_ms = int(round((last["move_onset_time"] - train_start).total_seconds() * 1000 + files["train"]["trial_start_ms"].min()))
    # the tensor holds behaviour at move + lag + (-250..450) ms, i.e. the readout of the
    # latents at move + (-250..450) ms
    velocity = files["train"]["latents"][move_ms - 250:move_ms + 450] @ truth.readout
    per_bin = velocity.reshape(split.bins, 20, 2).mean(axis=1)  # noise-free truth per 20 ms bin
    assert np.corrcoef(per_bin.ravel(), behavior[-1].ravel())[0, 1] > 0.95


def test_a_missing_dataset_folder_says_which_command_makes_it(homes, tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_HOME", str(tmp_path / "empty"))
    result = run_cli(cli.prep, "--split", "mc_maze-20ms-val")
    assert result.exit_code == 2
    assert "nlbfab-download --dataset mc_maze" in result.output and "nlbfab-synth --dataset mc_maze" in result.output
    assert "Traceback" not in result.output


def test_a_wrong_split_name_is_one_line_with_the_nearest_match(homes):
    result = run_cli(cli.prep, "--split", "mc_maze-20ms-vall")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: unknown split 'mc_maze-20ms-vall': did you mean mc_maze-20ms-val? "
        "(format: dataset-BINms-phase, e.g. mc_maze-20ms-val)"]


@pytest.mark.parametrize("text", ["", '{"split": ', "[]"])
def test_a_damaged_prep_marker_makes_the_split_stale(synthetic, tmp_path, text):
    split = get_split("mc_maze_small-20ms-test")
    homes = homes_with(data=synthetic, prep=tmp_path)
    prep.prepare_dataset(split.dataset, [split], homes, report=lambda line: None)
    (tmp_path / split.name / PREP_MARKER).write_text(text)  # cut short by a full disk, or edited
    assert not prep.is_up_to_date(split, homes)
    assert prep.prepare_dataset(split.dataset, [split], homes, report=lambda line: None) == [split]
    assert prep.is_up_to_date(split, homes)
