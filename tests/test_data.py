"""A preprocessed split becomes one immutable value; bad files fail with the rebuild command."""
import shutil

import h5py
import numpy as np
import pytest
import torch

from nlbfab.data import MONITORED_SHARE, batch_indices, load_split, load_test_heldin, with_eval_heldin, with_test_heldin
from nlbfab.errors import UserError
from nlbfab.splits import get_split
from tests.conftest import homes_with


def test_val_split_holds_inputs_targets_and_the_official_target(prepared):
    data = load_split(get_split("mc_maze-20ms-val"), homes_with(prep=prepared))
    assert data.train_heldin.shape == (40, 35, 12)
    assert data.train_recon.shape == (40, 45, 16)
    assert data.eval_recon.shape == (16, 45, 16)
    assert torch.equal(data.train_recon[:, :35, :12], data.train_heldin)
    assert set(data.target) >= {"eval_spikes_heldout", "psth", "train_behavior", "eval_behavior"}


def test_test_split_has_no_heldout_target(prepared):
    data = load_split(get_split("mc_maze-20ms-test"), homes_with(prep=prepared))
    assert data.target == {} and data.eval_recon.shape == (12, 35, 12)


def test_dmfc_loss_target_is_nan_free(prepared):
    data = load_split(get_split("dmfc_rsg-20ms-val"), homes_with(prep=prepared))
    assert not torch.isnan(data.eval_recon).any()


def copy_split(prepared, tmp_path, name):
    shutil.copytree(prepared / name, tmp_path / name)
    return tmp_path


def test_a_missing_file_names_it_and_the_command(prepared, tmp_path):
    home = copy_split(prepared, tmp_path, "area2_bump-20ms-val")
    (home / "area2_bump-20ms-val" / "eval_input.h5").unlink()
    with pytest.raises(UserError, match=r"missing .*eval_input.h5: run 'bin/nlbfab-prep --split area2_bump-20ms-val --force'"):
        load_split(get_split("area2_bump-20ms-val"), homes_with(prep=home))


def test_a_split_never_preprocessed_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(UserError, match=r"^area2_bump-20ms-val is not preprocessed: run 'bin/nlbfab-prep --split area2_bump-20ms-val'$"):
        load_split(get_split("area2_bump-20ms-val"), homes_with(prep=tmp_path))


def test_a_corrupt_file_names_it_and_the_command(prepared, tmp_path):
    home = copy_split(prepared, tmp_path, "area2_bump-20ms-val")
    path = home / "area2_bump-20ms-val" / "train_input.h5"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match=r"cannot read .*train_input.h5.*nlbfab-prep --split area2_bump-20ms-val"):
        load_split(get_split("area2_bump-20ms-val"), homes_with(prep=home))


def test_disagreeing_shapes_are_caught(prepared, tmp_path):
    home = copy_split(prepared, tmp_path, "mc_rtt-20ms-test")
    with h5py.File(home / "mc_rtt-20ms-test" / "eval_input.h5", "a") as h5:
        data = h5["eval_spikes_heldin"][()]
        del h5["eval_spikes_heldin"]
        h5["eval_spikes_heldin"] = data[:, :, :5]
    with pytest.raises(UserError, match="disagree"):
        load_split(get_split("mc_rtt-20ms-test"), homes_with(prep=home))


def test_nan_spikes_in_a_test_phases_eval_input_are_one_line(prepared, tmp_path):
    home = copy_split(prepared, tmp_path, "mc_rtt-20ms-test")
    with h5py.File(home / "mc_rtt-20ms-test" / "eval_input.h5", "a") as h5:
        h5["eval_spikes_heldin"][0, 0, 0] = np.nan
    with pytest.raises(UserError, match=r"NaN spikes in the eval tensors of .*mc_rtt-20ms-test: run 'bin/nlbfab-prep"):
        load_split(get_split("mc_rtt-20ms-test"), homes_with(prep=home))


@pytest.mark.parametrize("file, key, cut", [("train_input.h5", "train_spikes_heldout", np.s_[:, :, :3]),
                                            ("eval_input.h5", "eval_spikes_heldout", np.s_[:, :20]),
                                            ("train_input.h5", "train_spikes_heldin", np.s_[:0])])
def test_tensors_of_other_units_bins_or_no_trials_are_one_line(prepared, tmp_path, file, key, cut):
    home = copy_split(prepared, tmp_path, "area2_bump-20ms-val")
    with h5py.File(home / "area2_bump-20ms-val" / file, "a") as h5:
        data = h5[key][()]
        del h5[key]
        h5[key] = data[cut]
    with pytest.raises(UserError, match=r"(do not fit together|disagree).*run 'bin/nlbfab-prep --split area2_bump-20ms-val --force'"):
        load_split(get_split("area2_bump-20ms-val"), homes_with(prep=home))


@pytest.mark.parametrize("file, group, key", [("eval_target.h5", "area2_bump_20", "train_behavior"),
                                              ("eval_target.h5", "area2_bump_20", "eval_cond_idx"),
                                              ("train_input.h5", None, "train_spikes_heldout_forward")])
def test_a_file_without_a_key_the_run_reads_fails_before_training(prepared, tmp_path, file, group, key):
    """Caught at load time, not by the evaluation hook after training."""
    home = copy_split(prepared, tmp_path, "area2_bump-20ms-val")
    with h5py.File(home / "area2_bump-20ms-val" / file, "a") as h5:
        del h5[f"{group}/{key}" if group else key]
    with pytest.raises(UserError, match=rf"{file} lacks {key}: run 'bin/nlbfab-prep --split area2_bump-20ms-val --force'"):
        load_split(get_split("area2_bump-20ms-val"), homes_with(prep=home))


def test_batches_are_a_seeded_permutation():
    first = batch_indices(10, 4, torch.Generator().manual_seed(1))
    again = batch_indices(10, 4, torch.Generator().manual_seed(1))
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(torch.cat(first).tolist()) == list(range(10))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_training_on_eval_heldin_adds_the_eval_trials_with_only_their_heldin_known(prepared):
    data = load_split(get_split("mc_maze-20ms-val"), homes_with(prep=prepared))
    same, pool = with_eval_heldin(data, seed=0)
    train, evaluation = data.train_heldin.shape[0], data.eval_heldin.shape[0]
    assert same is data  # the val phase monitors the held-out neurons, which training never sees
    assert torch.equal(pool.heldin, torch.cat([data.train_heldin, data.eval_heldin]))
    assert torch.equal(pool.target[:train], data.train_recon)
    added = pool.target[train:]
    assert added.shape == (evaluation, *data.train_recon.shape[1:])
    assert torch.equal(added[:, :data.bins, :data.heldin], data.eval_heldin)
    assert torch.isnan(added[:, data.bins:]).all() and torch.isnan(added[:, :, data.heldin:]).all()


def test_on_the_test_phase_a_fixed_fifth_of_the_eval_heldin_is_monitored_and_never_trained(prepared):
    data = load_split(get_split("mc_rtt-20ms-test"), homes_with(prep=prepared))
    monitored_data, pool = with_eval_heldin(data, seed=3)
    train = data.train_heldin.shape[0]
    trained = ~torch.isnan(pool.target[train:, :data.bins, :data.heldin])
    monitored = ~torch.isnan(monitored_data.eval_recon)
    assert not (trained & monitored).any() and (trained | monitored).all()  # each entry one or the other
    assert torch.equal(monitored_data.eval_recon[monitored], data.eval_recon[monitored])
    assert monitored.float().mean() == pytest.approx(MONITORED_SHARE, abs=0.02)
    again, _ = with_eval_heldin(data, seed=3)
    other, _ = with_eval_heldin(data, seed=4)
    assert torch.equal(torch.isnan(again.eval_recon), ~monitored)  # fixed by the seed: resume sees the same
    assert not torch.equal(torch.isnan(other.eval_recon), ~monitored)


def test_training_on_test_heldin_adds_the_test_files_trials_with_only_their_heldin_known(prepared):
    data = load_split(get_split("mc_maze-20ms-val"), homes_with(prep=prepared))
    test = load_split(get_split("mc_maze-20ms-test"), homes_with(prep=prepared))
    _, pool = with_eval_heldin(data, seed=0)
    added = with_test_heldin(pool, load_test_heldin(data, homes_with(prep=prepared)))
    before = pool.heldin.shape[0]
    assert torch.equal(added.heldin, torch.cat([pool.heldin, test.eval_heldin]))  # the test phase's eval trials
    torch.testing.assert_close(added.target[:before], pool.target, rtol=0, atol=0, equal_nan=True)
    target = added.target[before:]
    assert torch.equal(target[:, :data.bins, :data.heldin], test.eval_heldin)
    assert torch.isnan(target[:, data.bins:]).all() and torch.isnan(target[:, :, data.heldin:]).all()


def test_test_heldin_of_a_test_split_never_preprocessed_names_the_command(prepared, tmp_path):
    home = copy_split(prepared, tmp_path, "mc_maze-20ms-val")
    data = load_split(get_split("mc_maze-20ms-val"), homes_with(prep=home))
    with pytest.raises(UserError, match=r"^--train-test-heldin reads mc_maze-20ms-test, which is not preprocessed: "
                                        r"run 'bin/nlbfab-prep --split mc_maze-20ms-test'$"):
        load_test_heldin(data, homes_with(prep=home))


def test_test_heldin_of_other_units_names_the_file_and_the_command(prepared, tmp_path):
    home = copy_split(prepared, tmp_path, "mc_maze-20ms-val")
    copy_split(prepared, tmp_path, "mc_maze-20ms-test")
    with h5py.File(home / "mc_maze-20ms-test" / "eval_input.h5", "r+") as h5:
        spikes = h5["eval_spikes_heldin"][()]
        del h5["eval_spikes_heldin"]
        h5["eval_spikes_heldin"] = spikes[:, :, :-1]
    data = load_split(get_split("mc_maze-20ms-val"), homes_with(prep=home))
    with pytest.raises(UserError, match=r"eval_input.h5: eval_spikes_heldin \(12, 35, 11\) is not test trials x 35 "
                                        r"bins x 12 held-in units .*nlbfab-prep --split mc_maze-20ms-test --force"):
        load_test_heldin(data, homes_with(prep=home))
