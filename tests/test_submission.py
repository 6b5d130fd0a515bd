"""The shared submission file: validated groups, safe concurrent merges."""
import multiprocessing
import shutil

import h5py
import numpy as np
import pytest

from nlbfab.errors import UserError
from nlbfab.splits import get_split
from nlbfab import cli
from nlbfab.submission import check_rates, expected_shapes, merge_rates, rates_files, submit, write_rates
from tests.conftest import homes_with, run_cli

SHAPES = {"train_rates_heldin": (3, 5, 2), "train_rates_heldout": (3, 5, 1),
          "eval_rates_heldin": (2, 5, 2), "eval_rates_heldout": (2, 5, 1)}


def rates(value=1.0):
    return {k: np.full(shape, value, np.float32) for k, shape in SHAPES.items()}


def merge_group(path, group, rates):
    """Merge one group through a rates file of its own, as a run does."""
    source = write_rates(path.parent / group / "rates.h5", group, "val", rates)
    return merge_rates(path, [source], lambda: rates_files(path.parent, "val"))


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
    expected = expected_shapes(split, homes_with(prep=prepared))
    path = submit(split, good, tmp_path, expected)
    before = path.read_bytes()
    with pytest.raises(UserError, match="eval_rates_heldout has shape"):
        submit(split, {**good, "eval_rates_heldout": np.ones((16, 29, 4))}, tmp_path, expected)
    assert path.read_bytes() == before


def submit_tiny(prepared, run_dir, name, value, lines=None):
    """Rates of ``value`` everywhere, in the shapes of the prepared split ``name``."""
    split = get_split(name)
    shapes = expected_shapes(split, homes_with(prep=prepared))
    return submit(split, {k: np.full(shape, value) for k, shape in shapes.items()}, run_dir, shapes,
                  report=(lines.append if lines is not None else print))


def test_a_damaged_submission_is_set_aside_and_rebuilt_with_every_runs_group(prepared, tmp_path):
    path = submit_tiny(prepared, tmp_path, "mc_rtt-20ms-val", 1.0)
    submit_tiny(prepared, tmp_path, "mc_rtt-05ms-val", 2.0)
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])  # as after a full disk or a killed copy
    (tmp_path / ".submission-val.h5.partial").write_bytes(b"left by a killed writer")
    lines = []
    submit_tiny(prepared, tmp_path, "mc_rtt-20ms-val", 3.0, lines)
    assert len(lines) == 1 and "damaged" in lines[0] and str(path) in lines[0]
    aside = list(tmp_path.glob("submission-val.h5.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == whole[:len(whole) // 2]  # moved, not deleted
    with h5py.File(path, "r") as h5:
        assert sorted(h5) == ["mc_rtt", "mc_rtt_20"]
        assert h5["mc_rtt_20/eval_rates_heldin"][0, 0, 0] == 3 and h5["mc_rtt/eval_rates_heldin"][0, 0, 0] == 2
    assert not list(tmp_path.glob(".*partial"))


def test_a_stale_partial_file_is_never_merged_into_a_new_submission(prepared, tmp_path):
    with h5py.File(tmp_path / ".submission-val.h5.partial", "w") as stale:
        stale.create_dataset("old_group/eval_rates_heldin", data=np.zeros(3))
    path = submit_tiny(prepared, tmp_path, "mc_rtt-20ms-val", 1.0)
    with h5py.File(path, "r") as h5:
        assert list(h5) == ["mc_rtt_20"]


def test_nlbfab_submit_rebuilds_both_submission_files_from_the_run_folders(prepared, homes):
    run_dir = homes["RUNS_HOME"] / "rebuild"
    for name, value in (("mc_rtt-20ms-val", 1.0), ("mc_rtt-05ms-val", 2.0), ("mc_rtt-20ms-test", 3.0)):
        submit_tiny(prepared, run_dir, name, value)
    (run_dir / "submission-val.h5").unlink()
    (run_dir / "submission-test.h5").write_bytes(b"not hdf5")
    result = run_cli(cli.submit, "--run-tag", "rebuild")
    assert result.exit_code == 0, result.output
    with h5py.File(run_dir / "submission-val.h5", "r") as val, h5py.File(run_dir / "submission-test.h5", "r") as test:
        assert sorted(val) == ["mc_rtt", "mc_rtt_20"] and list(test) == ["mc_rtt_20"]
        assert test["mc_rtt_20/eval_rates_heldout"][0, 0, 0] == 3
    assert len(list(run_dir.glob("submission-test.h5.damaged-*"))) == 1
    assert "2 group(s)" in result.output and "moved to" in result.output

    shutil.rmtree(run_dir / "mc_rtt-20ms-val")  # a split the user removed: its group goes too
    result = run_cli(cli.submit, "--run-tag", "rebuild")
    assert result.exit_code == 0, result.output
    with h5py.File(run_dir / "submission-val.h5", "r") as val:
        assert list(val) == ["mc_rtt"]

    rates = run_dir / "mc_rtt-05ms-val" / "rates.h5"
    rates.write_bytes(rates.read_bytes()[:500])
    result = run_cli(cli.submit, "--run-tag", "rebuild")
    assert result.exit_code == 0, result.output
    assert result.stderr.count(f"warning: {rates} is damaged and left out") == 1  # not once for each phase

    submit_tiny(prepared, run_dir, "mc_rtt-05ms-val", 2.0)
    shutil.rmtree(run_dir / "mc_rtt-20ms-test")  # the phase's last split: no group, so no file
    result = run_cli(cli.submit, "--run-tag", "rebuild")
    assert result.exit_code == 0, result.output
    assert not (run_dir / "submission-test.h5").exists() and (run_dir / "submission-val.h5").exists()


def test_nlbfab_submit_without_runs_says_so(homes):
    result = run_cli(cli.submit, "--run-tag", "never-ran")
    assert result.exit_code == 2 and result.output.startswith("error: no run 'never-ran'")
