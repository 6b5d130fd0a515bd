import pytest

from nlbfab.errors import UserError
from nlbfab.splits import ALL_SPLITS, DATASETS, SPLIT_NAMES, get_dataset, get_split


def test_there_are_28_distinct_splits_named_as_the_benchmark_does():
    assert len(SPLIT_NAMES) == len(set(SPLIT_NAMES)) == 28
    assert "mc_maze-20ms-val" in SPLIT_NAMES and "dmfc_rsg-05ms-test" in SPLIT_NAMES
    assert {s.dataset.name for s in ALL_SPLITS} == set(DATASETS)


def test_group_names_follow_nlb_tools():
    assert get_split("mc_maze-05ms-val").group == "mc_maze"
    assert get_split("mc_maze_small-20ms-test").group == "mc_maze_small_20"


def test_split_shapes_follow_the_benchmark():
    split = get_split("mc_maze-20ms-test")
    assert (split.bins, split.forward_bins) == (35, 10)
    assert split.train_splits == ["train", "val"] and split.train_trials == 2295
    assert get_split("dmfc_rsg-05ms-val").bins == 300
    assert get_split("mc_rtt-05ms-val").eval_trials == 270


def test_dandi_file_names_and_folders():
    maze, dmfc, rtt = DATASETS["mc_maze"], DATASETS["dmfc_rsg"], DATASETS["mc_rtt"]
    assert maze.folder == "000128/sub-Jenkins"
    assert maze.file_name("train") == "sub-Jenkins_ses-full_desc-train_behavior+ecephys.nwb"
    assert dmfc.file_name("train") == "sub-Haydn_desc-train_ecephys.nwb"
    assert rtt.file_name("test") == "sub-Indy_desc-test_ecephys.nwb"


def test_a_misspelt_split_suggests_the_nearest():
    with pytest.raises(UserError, match="did you mean mc_maze-20ms-val"):
        get_split("mc_maze-20-val")


def test_a_nonsense_split_lists_the_valid_ones():
    with pytest.raises(UserError, match="valid splits: .*area2_bump-05ms-val"):
        get_split("xyz")


def test_an_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(UserError, match="did you mean mc_maze.*valid datasets"):
        get_dataset("mc_maz")
