"""The synthetic datasets look like DANDI's NLB files to pynwb and nlb_tools."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from pynwb import NWBHDF5IO

from nlbfab.splits import DATASETS
from nlbfab.synth import counts, generate
from nlbfab.layout import TRUTH_FILE, dataset_dir


def read(path):
    io = NWBHDF5IO(str(path), "r")
    return io, io.read()


@pytest.mark.parametrize("name", list(DATASETS))
def test_files_have_the_dandi_layout(synthetic, name):
    dataset = DATASETS[name]
    n = counts(dataset, "tiny")
    folder = dataset_dir(synthetic, dataset)
    assert sorted(p.name for p in folder.glob("*.nwb")) == sorted(
        [dataset.file_name("train"), dataset.file_name("test")])
    assert (folder / TRUTH_FILE).is_file()

    io, train = read(folder / dataset.file_name("train"))
    with io:
        units = train.units.to_dataframe()
        trials = train.trials.to_dataframe()
        assert units["heldout"].sum() == n.heldout and (~units["heldout"]).sum() == n.heldin
        assert all(len(iv) >= 1 for iv in units["obs_intervals"])
        assert list(trials.index) == list(range(len(trials)))
        assert trials["split"].value_counts().to_dict() == {"train": n.train, "val": n.val, "none": n.none}
        behavior = train.processing["behavior"].data_interfaces if dataset.behavior else {}
        if dataset.behavior:
            series = behavior[dataset.behavior]
            assert series.comments == "columns=[x,y]"
            ms = series.timestamps[()] * 1000
            assert np.allclose(ms, np.round(ms))  # on the 1 ms grid, or nlb_tools drops it
        else:
            assert "behavior" not in train.processing

    io, test = read(folder / dataset.file_name("test"))
    with io:
        units = test.units.to_dataframe()
        trials = test.trials.to_dataframe()
        assert len(units) == n.heldin and not units["heldout"].any()
        assert set(trials["split"]) == {"test"} and len(trials) == n.test
        assert "behavior" not in test.processing
        assert all(c.endswith("_time") or c == "split" for c in trials.columns)


def test_each_dataset_keeps_its_own_trial_fields(synthetic):
    expected = {
        "mc_maze": {"move_onset_time", "trial_type", "trial_version", "maze_id", "success", "target_on_time",
                    "go_cue_time", "rt", "delay", "num_targets", "target_pos", "num_barriers", "barrier_pos",
                    "active_target"},
        "area2_bump": {"move_onset_time", "cond_dir", "ctr_hold_bump", "bump_time"},
        "dmfc_rsg": {"set_time", "go_time", "is_eye", "theta", "is_short", "ts", "tp", "is_outlier"},
        "mc_rtt": {"target_pos"},
    }
    for name, fields in expected.items():
        io, nwb = read(dataset_dir(synthetic, DATASETS[name]) / DATASETS[name].file_name("train"))
        with io:
            assert fields <= set(nwb.trials.colnames), name


def test_conditions_have_unequal_trial_counts(synthetic):
    io, nwb = read(dataset_dir(synthetic, DATASETS["mc_maze"]) / DATASETS["mc_maze"].file_name("train"))
    with io:
        per_condition = nwb.trials.to_dataframe().groupby(["trial_type", "trial_version"]).size()
    assert per_condition.nunique() > 1


def test_behaviour_of_trial_only_datasets_covers_only_trials(synthetic):
    dataset = DATASETS["mc_maze"]
    io, nwb = read(dataset_dir(synthetic, dataset) / dataset.file_name("train"))
    with io:
        ms = nwb.processing["behavior"]["hand_vel"].timestamps[()]
        trials = nwb.trials.to_dataframe()
        gaps = trials["start_time"].to_numpy()[1:] - trials["stop_time"].to_numpy()[:-1]
        assert gaps.min() > 0.05
        assert not np.any((ms > trials["stop_time"].iloc[0] + 0.01) & (ms < trials["start_time"].iloc[1] - 0.01))
        # the session ends where the last trial ends: the case that trips an unsorted load
        end = max(iv[-1][-1] for iv in nwb.units.to_dataframe()["obs_intervals"])
        assert end == pytest.approx(np.ceil(trials["stop_time"].iloc[-1] * 1000) / 1000)


def test_generation_is_deterministic_in_the_seed():
    dataset = DATASETS["dmfc_rsg"]
    first, _ = generate(dataset, "tiny", seed=3)
    again, _ = generate(dataset, "tiny", seed=3)
    other, _ = generate(dataset, "tiny", seed=4)
    assert np.array_equal(first["train"].latents, again["train"].latents)
    assert first["train"].trials.drop(columns=["target_pos"], errors="ignore").equals(
        again["train"].trials.drop(columns=["target_pos"], errors="ignore"))
    assert not np.array_equal(first["train"].latents, other["train"].latents)


def test_full_scale_uses_the_real_counts():
    for dataset in DATASETS.values():
        n = counts(dataset, "full")
        assert (n.heldin, n.heldout, n.train, n.val, n.test) == (
            dataset.heldin, dataset.heldout, dataset.train, dataset.val, dataset.test)


def test_truth_reproduces_the_spike_rates(synthetic):
    """Mean spike counts over the session match the rates the truth file implies."""
    dataset = DATASETS["mc_rtt"]
    folder = dataset_dir(synthetic, dataset)
    with h5py.File(folder / TRUTH_FILE) as h5:
        latents, loadings, bias = h5["train/latents"][()], h5["loadings"][()], h5["bias"][()]
    expected = np.exp(latents @ loadings + bias).sum(axis=0)  # spikes per unit over the session
    io, nwb = read(folder / dataset.file_name("train"))
    with io:
        observed = np.array([len(t) for t in nwb.units.to_dataframe()["spike_times"]])
    assert np.allclose(observed, expected, rtol=0.25)
    assert np.corrcoef(observed, expected)[0, 1] > 0.95
