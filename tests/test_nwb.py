"""The time-sorted load fixes nlb_tools' trial-only-behaviour trap on modern pandas."""
import numpy as np
import pandas as pd
import pytest
from nlb_tools.make_tensors import make_train_input_tensors
from nlb_tools.nwb_interface import NWBDataset
from pynwb import NWBHDF5IO

from nlbfab.errors import UserError
from nlbfab.nwb import load_dataset
from nlbfab.splits import DATASETS
from nlbfab.layout import dataset_dir


def test_unsorted_load_loses_the_last_trial_and_ours_does_not(synthetic):
    folder = dataset_dir(synthetic, DATASETS["mc_maze"])
    raw, ours = NWBDataset(str(folder)), load_dataset(folder)
    assert ours.data.index.is_monotonic_increasing
    last_end = ours.trial_info["end_time"].iloc[-1]
    assert ours.data.index[-1] >= last_end - pd.Timedelta(1, "ms")
    assert raw.data.index[-1] < last_end - pd.Timedelta(1, "s")  # the trap nlbfab works around
    ours.resample(5)
    tensors = make_train_input_tensors(ours, "mc_maze", trial_split=["train", "val"], save_file=False,
                                       include_behavior=True)
    assert not np.isnan(tensors["train_behavior"]).any()


def test_the_last_trials_behaviour_is_the_files_behaviour(synthetic):
    dataset = DATASETS["area2_bump"]
    folder = dataset_dir(synthetic, dataset)
    loaded = load_dataset(folder)
    with NWBHDF5IO(str(folder / dataset.file_name("train")), "r") as io:
        series = io.read().processing["behavior"]["hand_vel"]
        values = series.data[()]
    last = loaded.trial_info.iloc[-1]
    in_last = (loaded.data.index >= last["start_time"]) & (loaded.data.index < last["end_time"])
    got = loaded.data.loc[in_last, "hand_vel"].to_numpy()
    assert len(got) > 500 and not np.isnan(got).any()
    # behaviour covers only the trials, so the file's series ends with the last trial's samples
    assert np.allclose(got, values[-len(got):], atol=1e-6)


def test_a_folder_without_nwb_files_says_what_to_run(tmp_path):
    with pytest.raises(UserError, match="no NWB files in .*: run this"):
        load_dataset(tmp_path, hint="run this")


def test_psths_from_memory_equal_nlb_tools_own_and_read_no_file(synthetic, monkeypatch):
    import copy

    from nlb_tools.make_tensors import make_eval_target_tensors

    from nlbfab.nwb import reused_by_nlb_tools

    loaded = load_dataset(dataset_dir(synthetic, DATASETS["mc_maze_small"]))
    binned = copy.copy(loaded)
    binned.data = loaded.data.copy()
    binned.resample(20)
    args = dict(train_trial_split="train", eval_trial_split="val", save_file=False, include_psth=True)
    official = make_eval_target_tensors(binned, "mc_maze_small", **args)["mc_maze_small_20"]

    reads = []
    original_load = NWBDataset.load
    monkeypatch.setattr(NWBDataset, "load", lambda self, *a, **k: reads.append(a) or original_load(self, *a, **k))
    with reused_by_nlb_tools(loaded):
        ours = make_eval_target_tensors(binned, "mc_maze_small", **args)["mc_maze_small_20"]
    assert reads == []
    assert np.allclose(ours["psth"], official["psth"], rtol=1e-4, atol=1e-6, equal_nan=True)
    for key in ("eval_cond_idx", "train_cond_idx"):
        assert all(np.array_equal(a, b) for a, b in zip(ours[key], official[key]))
