"""A synthetic dataset's test phase is scored against the test file EvalAI would hold: DANDI's
held-in spikes plus everything DANDI's copy leaves out, cut by nlb_tools' rules."""
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from nlbfab import cli
from nlbfab.errors import UserError
from nlbfab.evalai_target import evalai_target
from nlbfab.layout import dataset_dir, hidden_test_file, read_metrics
from nlbfab.native.session import open_session
from nlbfab.native.tensors import Binned, eval_target, value_fields
from nlbfab.oracle import oracle_rates
from nlbfab.scoring import score
from nlbfab.smoothing import SETTINGS, smoothing_rates
from nlbfab.splits import DATASETS, get_split
from nlbfab.submission import write_rates
from tests.conftest import homes_with, run_cli


def evalai_session(data_home, dataset):
    """The dataset as EvalAI holds it: its train file and EvalAI's test file."""
    folder = dataset_dir(data_home, dataset)
    return open_session(folder, value_fields(dataset.name),
                        paths=[hidden_test_file(data_home, dataset), folder / dataset.file_name("train")])


def arrays(path_or_dict):
    if isinstance(path_or_dict, dict):
        return {f"{g}/{k}": np.asarray(v, dtype=object if k.endswith("cond_idx") else None)
                for g, group in path_or_dict.items() for k, v in group.items()}
    with h5py.File(path_or_dict) as h5:
        return {f"{g}/{k}": h5[g][k][()] for g in h5 for k in h5[g]}


@pytest.mark.parametrize("name", ["mc_maze", "dmfc_rsg"])
def test_evalai_test_file_has_dandis_held_in_spikes_and_what_dandi_leaves_out(synthetic, name):
    dataset = DATASETS[name]
    public = open_session(dataset_dir(synthetic, dataset))
    hidden = evalai_session(synthetic, dataset)
    for a, b in zip(public.fields["spikes"].rows + public.fields["spikes"].counts,
                    hidden.fields["spikes"].rows + hidden.fields["spikes"].counts):
        assert np.array_equal(a, b)
    test_trials = hidden.trial_info["split"] == "test"
    test_rows = [int(t.total_seconds() * 1000) for t in hidden.trial_info.loc[test_trials, "start_time"]]
    assert public.trial_info.loc[test_trials].drop(columns="split").isna().all(axis=1).sum() == 0  # timing kept
    assert not public.complete.contains(np.array(test_rows)).any()  # DANDI's: no held-out units there
    assert hidden.complete.contains(np.array(test_rows)).all()
    condition = {"mc_maze": "trial_type", "dmfc_rsg": "is_eye"}[name]
    assert public.trial_info.loc[test_trials, condition].isna().all()
    assert hidden.trial_info.loc[test_trials, condition].notna().all()


@pytest.mark.parametrize("name", ["mc_maze-20ms-val", "dmfc_rsg-05ms-val", "area2_bump-20ms-val", "mc_rtt-05ms-val"])
def test_evalai_files_give_the_val_phase_its_own_target(prepared, synthetic, name):
    split = get_split(name)
    session = evalai_session(synthetic, split.dataset)
    made = arrays(eval_target(Binned(session, split.bin_ms, session.trial_info), split.dataset.name,
                              include_psth=True, train_split=split.train_splits, eval_split=split.eval_split))
    prepped = arrays(prepared / split.name / "eval_target.h5")
    assert made.keys() == prepped.keys()
    for key, value in prepped.items():
        if value.dtype == object:  # trial indices per condition
            assert all(np.array_equal(a, b) for a, b in zip(made[key], value, strict=True)), key
        elif key.endswith("behavior") and split.dataset.name == "mc_rtt":
            # behaviour recorded through the whole session is low-pass filtered as it is resampled:
            # the test file's, which DANDI's copy lacks, reaches the first train bins by a little
            assert np.allclose(made[key], value, rtol=1e-3, atol=0.02, equal_nan=True), key
        else:
            assert np.array_equal(made[key], value, equal_nan=True), key


@pytest.mark.parametrize("name", ["mc_maze-20ms-test", "mc_maze_small-05ms-test", "area2_bump-05ms-test",
                                  "mc_rtt-20ms-test"])
def test_the_test_phase_scores_the_oracle_above_smoothing(prepared, synthetic, tmp_path, name):
    split = get_split(name)
    target = evalai_target(homes_with(), split)
    with h5py.File(prepared / split.name / "train_input.h5") as train, \
            h5py.File(prepared / split.name / "eval_input.h5") as evaluation:
        heldin, heldout = train["train_spikes_heldin"][()], train["train_spikes_heldout"][()]
        eval_heldin = evaluation["eval_spikes_heldin"][()]
    group = target[split.group]
    assert group["eval_spikes_heldout"].shape[:2] == eval_heldin.shape[:2]  # the test trials, as submitted
    assert group["eval_spikes_heldout"].shape[2] == heldout.shape[2]
    scores = {}
    smoothed = smoothing_rates(heldin, heldout, eval_heldin, split.bin_ms, *SETTINGS[split.dataset.name])
    for model, rates in (("smoothing", smoothed), ("oracle", oracle_rates(synthetic, split))):
        scores[model] = score(target, write_rates(tmp_path / f"{model}.h5", split.group, split.phase, rates), split)
    assert scores["oracle"]["co-bps"] > scores["smoothing"]["co-bps"] + 0.02
    assert all(np.isfinite(v) for v in scores["oracle"].values()) and "fp-bps" in scores["oracle"]


def test_scores_command_scores_a_synthetic_test_split_and_says_why_not_elsewhere(prepared, synthetic, homes,
                                                                                 tmp_path, monkeypatch):
    assert run_cli(cli.baseline, "--method", "oracle", "--split", "mc_rtt-20ms-test").exit_code == 0
    result = run_cli(cli.scores, "--split", "mc_rtt-20ms-test", "--run-tag", "oracle")
    assert result.exit_code == 0, result.output
    assert "mc_rtt-20ms-test" in result.output and "co-bps" in result.output and "100.0%" in result.output
    assert "add --run-tag oracle" not in result.stderr
    # a tag longer than the first column keeps the columns in line; without the oracle, how to add it
    long_tag = "oracle-copy-with-a-long-tag"
    shutil.copytree(homes["RUNS_HOME"] / "oracle", homes["RUNS_HOME"] / long_tag)
    result = run_cli(cli.scores, "--split", "mc_rtt-20ms-test", "--run-tag", long_tag)
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()[-2:]
    first_value = row.split()[1]  # co-bps, right-aligned under its name
    assert row.startswith(long_tag + "  ")
    assert header.index("co-bps") + len("co-bps") == row.index(first_value) + len(first_value)
    assert "add --run-tag oracle, made by 'bin/nlbfab-baseline --split mc_rtt-20ms-test --method oracle'" in result.stderr

    missing = run_cli(cli.scores, "--split", "mc_rtt-20ms-test", "--run-tag", "oracle", "--run-tag", "never-run")
    assert missing.exit_code == 2 and missing.stderr.splitlines() == [missing.stderr.strip()]  # before any cutting
    assert "no submission for run 'never-run'" in missing.stderr
    assert "'bin/nlbfab-train --split mc_rtt-20ms-test --run-tag never-run'" in missing.stderr
    other_split = run_cli(cli.scores, "--split", "mc_rtt-05ms-test", "--run-tag", "oracle")  # its file: 20 ms only
    assert other_split.exit_code == 2 and other_split.stderr.splitlines() == [other_split.stderr.strip()]
    assert "run 'oracle' has no mc_rtt-05ms-test" in other_split.stderr
    assert "make it with 'bin/nlbfab-baseline --split mc_rtt-05ms-test --method oracle'" in other_split.stderr

    dataset = DATASETS["mc_rtt"]
    copy = dataset_dir(tmp_path, dataset)
    shutil.copytree(dataset_dir(synthetic, dataset), copy)
    monkeypatch.setenv("DATA_HOME", str(tmp_path))
    shutil.rmtree(hidden_test_file(tmp_path, dataset).parent)  # synthesized before the file existed
    result = run_cli(cli.scores, "--split", "mc_rtt-20ms-test", "--run-tag", "oracle")
    assert result.exit_code == 2 and "nlbfab-synth --dataset mc_rtt' with the same" in result.stderr
    (copy / "synthetic_truth.h5").unlink()  # a real dataset
    result = run_cli(cli.scores, "--split", "mc_rtt-20ms-test", "--run-tag", "oracle")
    assert result.exit_code == 2 and "only EvalAI can score it" in result.stderr


def test_a_dmfc_rsg_test_file_too_small_for_the_tp_correlation_says_so(prepared, synthetic):
    # --scale tiny: 12 test trials over 6 conditions, some of one trial (small and full have 2 or more)
    with pytest.raises(UserError, match="single trial, and nlb_tools' tp correlation needs two"):
        evalai_target(homes_with(), get_split("dmfc_rsg-20ms-test"))


def test_a_test_phase_run_on_synthetic_data_is_scored_as_the_scores_command_scores_it(prepared, synthetic, homes):
    split = get_split("mc_rtt-20ms-test")
    result = run_cli(cli.train, "--split", split.name, "--run-tag", "scored-test", "--hidden-size", "16",
                     "--batch-size", "16", "--max-epochs", "2", "--ensemble", "2", "--accelerator", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert "scored against the test file EvalAI would hold" in result.output
    summary = read_metrics(homes["RUNS_HOME"] / "scored-test" / split.name)
    expected = score(evalai_target(homes_with(), split), Path(summary["submission"]), split)
    assert summary["metrics"] == pytest.approx(expected) and math.isfinite(summary["metrics"]["co-bps"])
    assert f"co-bps     {expected['co-bps']:.4f}" in result.output
    members = [line for line in result.output.splitlines() if line.strip().startswith(("0*", "1*", "mean of *"))]
    assert len(members) == 3 and "val loss" in result.output and "-val loss" not in result.output
    losses = [float(line.split()[3]) for line in members[:2]]  # members show the held-in loss they stopped on
    ensemble = summary["ensemble"]["members"]
    assert losses == pytest.approx([-m["best_monitored"] for m in ensemble], abs=1e-4) and min(losses) > 0


def test_a_test_phase_run_without_evalais_copy_is_submitted_unscored(prepared, synthetic, tmp_path, monkeypatch):
    dataset, split = DATASETS["mc_rtt"], get_split("mc_rtt-20ms-test")
    shutil.copytree(dataset_dir(synthetic, dataset), dataset_dir(tmp_path, dataset))
    shutil.rmtree(hidden_test_file(tmp_path, dataset).parent)  # as a real dataset from DANDI
    monkeypatch.setenv("DATA_HOME", str(tmp_path))
    result = run_cli(cli.train, "--split", split.name, "--run-tag", "real-test", "--hidden-size", "16",
                     "--max-epochs", "1", "--accelerator", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert "rates in" in result.output and "co-bps" not in result.output and "scored against" not in result.output
    assert "metrics" not in read_metrics(homes_with().run_dir("real-test", split))


def test_a_baseline_on_a_test_split_is_scored_where_it_can_be_and_says_why_not(prepared, synthetic):
    result = run_cli(cli.baseline, "--method", "smoothing", "--split", "mc_maze-20ms-test", "--split",
                     "dmfc_rsg-20ms-test", "--run-tag", "smoothing-test")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    written = next(line for line in lines if line.startswith("mc_maze-20ms-test: smoothing rates written to"))
    assert lines[lines.index(written) - 1].startswith("mc_maze-20ms-test: cutting its target from")
    scored = lines[lines.index(written) + 1]
    assert "co-bps" in scored and "psth R2" in scored
    # --scale tiny leaves dmfc_rsg conditions of a single test trial: written, not scored, and why
    assert any(line.startswith("dmfc_rsg-20ms-test: not scored here:") and "tp correlation needs two" in line
               for line in lines)
    assert any(line.startswith("dmfc_rsg-20ms-test: smoothing rates written to") for line in lines)
