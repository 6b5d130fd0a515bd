"""The shared submission file: validated groups, safe concurrent merges."""
import multiprocessing

import h5py
import numpy as np
import pytest

from nlbfab.config import split_file_names
from nlbfab.errors import UserError
from nlbfab.splits import get_split
from nlbfab.submission import check_rates, merge_group, submit

SHAPES = {"train_rates_heldin": (3, 5, 2), "train_rates_heldout": (3, 5, 1),
          "eval_rates_heldin": (2, 5, 2), "eval_rates_heldout": (2, 5, 1)}


def rates(value=1.0):
    return {k: np.full(shape, value, np.float32) for k, shape in SHAPES.items()}


def write_group(args):
    path, group, value = args
    for _ in range(3):  # several merges each, to interleave with the others
        merge_group(path, group, rates(value))
    return group


def test_eight_concurrent_writers_lose_no_group(tmp_path):
    path = tmp_path / "submission-val.h5"
    groups = [f"group_{i}" for i in range(8)]
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        pool.map(write_group, [(path, g, i) for i, g in enumerate(groups)])
    with h5py.File(path, "r") as h5:
        assert sorted(h5) == groups
        for i, group in enumerate(groups):
            assert np.all(h5[group]["eval_rates_heldout"][()] == i)
    assert not list(tmp_path.glob(".*partial"))


def test_a_rerun_replaces_its_group_and_keeps_the_others(tmp_path):
    path = tmp_path / "s.h5"
    merge_group(path, "a", rates(1))
    merge_group(path, "b", rates(2))
    merge_group(path, "a", rates(3))
    with h5py.File(path, "r") as h5:
        assert h5["a/eval_rates_heldin"][0, 0, 0] == 3 and h5["b/eval_rates_heldin"][0, 0, 0] == 2


def test_wrong_shapes_missing_arrays_and_nan_are_refused():
    with pytest.raises(UserError, match=r"eval_rates_heldout has shape \(2, 5, 3\), the split's tensors need \(2, 5, 1\)"):
        check_rates({**rates(), "eval_rates_heldout": np.ones((2, 5, 3))}, SHAPES, "g")
    with pytest.raises(UserError, match=r"missing \['train_rates_heldin'\]"):
        check_rates({k: v for k, v in rates().items() if k != "train_rates_heldin"}, SHAPES, "g")
    with pytest.raises(UserError, match="NaN or infinite"):
        check_rates({**rates(), "eval_rates_heldin": np.full((2, 5, 2), np.nan)}, SHAPES, "g")


def test_submit_checks_against_the_splits_tensors_and_keeps_the_file_intact(prepared, tmp_path):
    split = get_split("mc_rtt-20ms-val")
    good = {"train_rates_heldin": np.ones((40, 30, 12)), "train_rates_heldout": np.ones((40, 30, 4)),
            "eval_rates_heldin": np.ones((16, 30, 12)), "eval_rates_heldout": np.ones((16, 30, 4))}
    path = submit(split, good, tmp_path, prepared / split.name, split_file_names())
    before = path.read_bytes()
    with pytest.raises(UserError, match="eval_rates_heldout has shape"):
        submit(split, {**good, "eval_rates_heldout": np.ones((16, 29, 4))}, tmp_path, prepared / split.name,
               split_file_names())
    assert path.read_bytes() == before
