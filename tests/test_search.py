"""nlbfab-search: a Ray Tune search (Optuna TPE, ASHA) of ordinary training runs on a local Ray
instance, its table and best.json, the mean of its best trials as the submission, --resume after
an interruption, and a bad search space refused in one line before Ray starts."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from nlbfab import cli, layout
from nlbfab.data import load_split
from nlbfab.evaluation import co_bps
from nlbfab.models import MODELS, get_model
from nlbfab.search_space import check_trials, choice, integer, loguniform, read_space, settle
from nlbfab.splits import get_split
from tests.conftest import homes_with, run_cli

SPLIT = get_split("mc_maze_small-20ms-val")
TEST_SPLIT = get_split("mc_maze_small-20ms-test")
TINY = {"hidden_size": {"choice": [4, 8]}, "batch_size": None}  # the SAE's space, tiny, its batch size left out
QUICK = ["--max-epochs", "3", "--log-every-n-epochs", "100"]


def space_file(tmp_path, space) -> str:
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space) if not isinstance(space, str) else space)
    return str(path)


def rates(path) -> dict:
    with h5py.File(path, "r") as h5:
        return {key: h5[name][key][()] for name in h5 for key in h5[name]}


def trials(folder) -> list[dict]:
    return json.loads(layout.search_trials(folder).read_text())["trials"]


@pytest.fixture(scope="module")
def searched(prepared, homes, tmp_path_factory):
    """A 4-trial search on a local Ray instance of 2 CPUs, one trial at a time so that ASHA's
    decisions (from epoch 1) are reproducible, whose 2 best trials are submitted (val and test
    phase). With --seed 2, TPE's second trial is behind the first at epoch 1 (-0.0206 against
    -0.0195) and ASHA stops it there."""
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        space = space_file(tmp_path_factory.mktemp("space"), TINY)
        result = run_cli(cli.search, "--split", SPLIT.name, "--trials", "4", "--run-tag", "srch", "--concurrent", "1",
                         "--grace-epochs", "1", "--seed", "2", "--space", space, "--submit-top", "2", *QUICK)
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    return result.output, layout.search_dir(homes["RUNS_HOME"] / "srch", SPLIT)


def test_a_search_runs_its_trials_as_training_runs_and_reports_them(searched, homes):
    output, folder = searched
    rows = trials(folder)
    assert len(rows) == 4 and len(re.findall(r"\[\d/4 done, \d running\] trial_\w+: ", output)) == 4
    scores = [r["val_co_bps"] for r in rows]
    assert scores == sorted(scores, reverse=True)  # the table and trials.json: best first
    assert sorted(r["status"] for r in rows) == ["finished"] * 3 + ["stopped"]
    assert "after 1 epoch (stopped early by ASHA)" in output
    for row in rows:
        assert row["trial"] in output
        config = json.loads(layout.config_file(folder / row["trial"] / SPLIT.name).read_text())
        # the drawn values, the space file's choices and the option passed through
        assert config["hparams"]["hidden_size"] == row["params"]["hidden_size"] in (4, 8)
        assert 2e-3 <= config["learning_rate"] == row["params"]["learning_rate"] <= 2e-2
        assert "batch_size" not in row["params"] and config["max_epochs"] == 3
        run = folder / row["trial"] / SPLIT.name
        if row["status"] == "finished":  # trained to its own stop: its rates and scores are there
            metrics = layout.read_metrics(run)
            assert metrics["epochs"] == 3 and abs(metrics["metrics"]["co-bps"] - row["val_co_bps"]) < 1e-6
            assert layout.rates_file(run).is_file()
        else:  # stopped by ASHA at its first rung, before the end
            assert row["epochs"] == 1 and not layout.metrics_file(run).is_file()


def test_best_json_holds_the_best_trial_and_nlbfab_train_config_reproduces_it(searched, homes):
    _, folder = searched
    best = json.loads(layout.best_config(folder).read_text())
    top = trials(folder)[0]
    trained = json.loads(layout.config_file(folder / top["trial"] / SPLIT.name).read_text())
    assert best == {k: v for k, v in trained.items() if k not in ("run_tag", "accelerator")}

    result = run_cli(cli.train, "--config", str(layout.best_config(folder)), "--run-tag", "from-best", "--quiet")
    assert result.exit_code == 0, result.output
    again = layout.read_metrics(homes["RUNS_HOME"] / "from-best" / SPLIT.name)
    assert abs(again["metrics"]["co-bps"] - top["val_co_bps"]) < 1e-6


def test_submit_top_submits_the_mean_rates_of_the_chosen_trials(searched, homes):
    output, folder = searched
    chosen = re.search(r"the mean of (trial_\w+(?:, trial_\w+)*) in", output).group(1).split(", ")
    finished = [r["trial"] for r in trials(folder) if r["status"] == "finished"]
    assert 1 <= len(chosen) <= 2 and chosen[0] == finished[0] and set(chosen) <= set(finished)  # the best first
    val_rates = {t: rates(layout.rates_file(folder / t / SPLIT.name))["eval_rates_heldout"] for t in finished}
    data = load_split(SPLIT, homes_with())
    chosen_score = co_bps(data, np.mean([val_rates[t] for t in chosen], 0))
    if len(chosen) == 1:  # greedy stopped: no other finished trial raises the mean's co-bps
        assert all(co_bps(data, (val_rates[chosen[0]] + val_rates[t]) / 2) <= chosen_score
                   for t in finished if t != chosen[0])
    tag = homes["RUNS_HOME"] / "srch"
    for split in (SPLIT, TEST_SPLIT):
        submitted = rates(layout.submission_file(tag, split.phase))
        members = [rates(layout.rates_file(folder / trial / split.name)) for trial in chosen]
        assert submitted.keys() == members[0].keys() and "eval_rates_heldout" in submitted
        for key, value in submitted.items():
            np.testing.assert_allclose(value, np.mean([m[key] for m in members], 0), rtol=1e-6)
    assert re.search(r"co-bps\s+-?\d\.\d{4}", output)  # the submission scored as EvalAI would


def test_two_trials_submitted_are_the_mean_of_their_rates(searched, homes, tmp_path):
    from nlbfab.pool import submit_mean
    _, folder = searched
    two = [r["trial"] for r in trials(folder) if r["status"] == "finished"][:2]
    submitted = submit_mean(SPLIT, [folder / t / SPLIT.name for t in two], homes_with(runs=tmp_path), "two", print)
    written, members = rates(submitted["submission"]), [rates(layout.rates_file(folder / t / SPLIT.name)) for t in two]
    for key, value in written.items():
        np.testing.assert_allclose(value, (members[0][key] + members[1][key]) / 2, rtol=1e-6)
    assert np.isfinite(submitted["metrics"]["co-bps"])


def test_resume_continues_an_interrupted_search_without_redoing_finished_trials(searched, homes, tmp_path):
    """The same search as ``searched`` (same seed, so the same draws), two trials at a time and
    without ASHA, interrupted as Ctrl-C does once a trial has finished, then resumed."""
    folder = layout.search_dir(homes["RUNS_HOME"] / "resumed", SPLIT)
    command = [sys.executable, "-m", "nlbfab.cli", "search", "--split", SPLIT.name, "--trials", "4", "--seed", "2",
               "--concurrent", "2", "--run-tag", "resumed", "--space", space_file(tmp_path, TINY), *QUICK]
    search = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    read = []
    for line in search.stdout:  # the search's own line once Tune has recorded a trial finished
        read.append(line)
        if line.startswith("[1/4 done"):
            break
    search.send_signal(signal.SIGINT)  # Tune saves its state and stops
    rest, _ = search.communicate(timeout=120)
    output = "".join(read) + rest
    assert search.returncode == 130 and "2 at a time" in output and "--resume" in output, output
    # finished as the search recorded them: a trial Tune stopped may still write its metrics as it goes
    done = {r["trial"]: (folder / r["trial"] / SPLIT.name / layout.METRICS_FILE).stat().st_mtime_ns
            for r in trials(folder) if r["status"] == "finished"}
    assert 1 <= len(done) < 4, output

    result = run_cli(cli.search, "--split", SPLIT.name, "--run-tag", "resumed", "--resume")
    assert result.exit_code == 0, result.output
    rows = trials(folder)
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    for trial, mtime in done.items():  # not trained again
        assert (folder / trial / SPLIT.name / layout.METRICS_FILE).stat().st_mtime_ns == mtime
    # each trial, whether finished before, interrupted mid-run and resumed, or new, scores as in
    # the uninterrupted search (where ASHA let it finish)
    resumed = {json.dumps(r["params"], sort_keys=True): r["val_co_bps"] for r in rows}
    for row in [r for r in trials(searched[1]) if r["status"] == "finished"]:
        assert abs(resumed[json.dumps(row["params"], sort_keys=True)] - row["val_co_bps"]) < 1e-6


@pytest.mark.parametrize("space, message", [
    ({"hiden_size": {"choice": [4]}}, "the search space names hiden_size: not a parameter of model sae"),
    ({"dropout": {"normal": [0, 1]}}, "dropout: unknown distribution 'normal'"),
    ({"dropout": {"uniform": [0, 1]}}, 'search space dropout {"uniform": [0, 1]}: --dropout 1: must be in [0, 1)'),
    ({"hidden_size": {"loguniform": [4, 64]}}, "a whole-number parameter needs int, or choice of whole numbers"),
    ({"learning_rate": {"loguniform": [1e-4, 1e-2]}}, "--min-lr 0.001 must be below --learning-rate 0.0001"),
    ("{not json", "not JSON"),
])
def test_a_bad_search_space_fails_in_one_line_before_ray_starts(prepared, homes, tmp_path, space, message):
    result = run_cli(cli.search, "--split", SPLIT.name, "--run-tag", "bad", "--space", space_file(tmp_path, space))
    assert result.exit_code == 2 and result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert message in result.output, result.output
    assert not (homes["RUNS_HOME"] / "bad").exists()


def test_a_space_over_an_option_that_acts_only_with_companions_needs_them(prepared, homes, tmp_path):
    space = space_file(tmp_path, {"readin_dim": {"choice": [8, 16]}})
    result = run_cli(cli.search, "--split", SPLIT.name, "--run-tag", "bad", "--space", space, "--model", "lfads")
    assert result.exit_code == 2 and result.output.startswith("error: search space readin_dim")
    assert "--readin-dim acts only with --with-splits: add --with-splits or drop it" in result.output
    assert not (homes["RUNS_HOME"] / "bad").exists()


def test_train_test_heldin_needs_the_test_split_prepared_before_ray_starts(prepared, homes, tmp_path, monkeypatch):
    shutil.copytree(prepared / SPLIT.name, tmp_path / SPLIT.name)
    monkeypatch.setenv("PREP_HOME", str(tmp_path))
    result = run_cli(cli.search, "--split", SPLIT.name, "--run-tag", "needs-test", "--train-test-heldin")
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        f"error: --train-test-heldin reads {TEST_SPLIT.name}, which is not preprocessed: run 'bin/nlbfab-prep --split "
        f"{TEST_SPLIT.name}'"]
    assert not (homes["RUNS_HOME"] / "needs-test").exists()


def test_an_unreadable_space_file_and_a_test_split_are_refused(prepared, homes, tmp_path):
    missing = run_cli(cli.search, "--split", SPLIT.name, "--space", str(tmp_path / "none.json"))
    assert missing.exit_code == 2 and "cannot read it" in missing.output
    test = run_cli(cli.search, "--split", TEST_SPLIT.name)
    assert test.exit_code == 2 and "search on mc_maze_small-20ms-val" in test.output


def test_every_models_own_space_is_valid_and_a_file_or_an_option_changes_it():
    for model in MODELS.values():
        space, fixed = settle(model, {}, set())
        assert space and not fixed
        check_trials(SPLIT.name, fixed, space, model)
    space, fixed = settle(get_model("sae"), {"dropout": 0.3, "batch_size": None, "lr_patience": integer(8, 16)},
                          given={"hidden_size"})
    assert set(space) == {"learning_rate", "weight_decay", "lr_patience"} and fixed == {"dropout": 0.3}


def test_a_space_file_may_be_yaml(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("hidden_size: {choice: [4, 8]}\nlearning_rate: {loguniform: [0.002, 0.01]}\nbatch_size: null\n")
    assert read_space(path) == {"hidden_size": choice(4, 8), "learning_rate": loguniform(0.002, 0.01),
                                "batch_size": None}
    path.write_text("learning_rate: {loguniform: [2e-3, 1.0e-2]}\nweight_decay: 1e-5\n")  # YAML 1.1 reads 2e-3 as text
    assert read_space(path) == {"learning_rate": loguniform(0.002, 0.01), "weight_decay": 1e-5}


def test_nlbfab_train_refuses_a_config_file_of_unknown_settings(prepared, tmp_path):
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"split": SPLIT.name, "learing_rate": 0.01}))
    result = run_cli(cli.train, "--config", str(path))
    assert result.exit_code == 2 and "not settings of nlbfab-train: learing_rate" in result.output
    assert result.output.count("\n") == 1


@pytest.mark.parametrize("settings, message", [
    ({"hparams": {"hidden_size": "x"}}, '--hidden-size "x": must be a whole number'),
    ({"hparams": {"hidden_size": 2.5}}, "--hidden-size 2.5: must be a whole number"),
    ({"hparams": {"hidden_size": True}}, "--hidden-size true: must be a whole number"),
    ({"hparams": [1]}, "hparams must be an object of the model's hyperparameters"),
    ({"seed": None, "model": None}, "model, seed cannot be null: give a value or leave it out"),
    ({"ensemble": 2.5}, "--ensemble 2.5: must be a whole number"),
    ({"learning_rate": "fast"}, '--learning-rate "fast": must be a number'),
])
def test_nlbfab_train_refuses_a_config_file_of_wrong_types_in_one_line(prepared, tmp_path, settings, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"split": SPLIT.name, **settings}))
    result = run_cli(cli.train, "--config", str(path), "--max-epochs", "1")
    assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, result.output


def test_a_config_file_of_another_model_gives_its_settings_but_not_its_hyperparameters(prepared, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"split": SPLIT.name, "model": "lfads", "batch_size": 16, "run_tag": "other-model",
                                "average_decay": 0.995, "train_eval_heldin": True,  # as an LFADS run settles them
                                "hparams": {"cd_rate": 0.2, "fac_dim": 4}}))
    result = run_cli(cli.train, "--config", str(path), "--model", "sae", "--hidden-size", "8", "--max-epochs", "1",
                     "--quiet")
    assert result.exit_code == 0, result.output
    saved = json.loads(layout.config_file(homes_with().run_dir("other-model", SPLIT)).read_text())
    assert saved["model"] == "sae" and saved["batch_size"] == 16 and saved["hparams"] == {"hidden_size": 8}
    assert saved["average_decay"] == 0 and saved["train_eval_heldin"] is False  # the SAE's own defaults


def test_a_config_file_without_a_model_keeps_its_hyperparameters_for_the_model_given(prepared, tmp_path):
    """A hand-written file of LFADS settings (no "model" key) for --model lfads is no other model's."""
    path = tmp_path / "lfads.json"
    path.write_text(json.dumps({"split": SPLIT.name, "run_tag": "no-model-key", "average_decay": 0.9,
                                "hparams": {"fac_dim": 4, "co_dim": 2}}))
    result = run_cli(cli.train, "--config", str(path), "--model", "lfads", "--max-epochs", "1", "--quiet")
    assert result.exit_code == 0, result.output
    saved = json.loads(layout.config_file(homes_with().run_dir("no-model-key", SPLIT)).read_text())
    assert saved["hparams"]["fac_dim"] == 4 and saved["hparams"]["co_dim"] == 2 and saved["average_decay"] == 0.9


def test_nlbfab_all_searches_each_dataset_and_bin_and_submits_both_phases(prepared, homes):
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_cli(cli.sweep, "--datasets", "mc_maze_small", "--bins", "20", "--run-tag", "all-search",
                         "--search", "2", "--search-top", "1", "--hidden-size", "8", "--batch-size", "16", *QUICK)
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    tag = homes["RUNS_HOME"] / "all-search"
    folder = layout.search_dir(tag, SPLIT)
    assert len(trials(folder)) == 2 and (folder / "best.json").is_file()
    best = trials(folder)[0]  # the top 1 is the best finished trial
    submitted, trained = rates(layout.submission_file(tag, "val")), rates(folder / best["trial"] / SPLIT.name / "rates.h5")
    assert submitted.keys() == trained.keys()
    for key in trained:
        np.testing.assert_allclose(submitted[key], trained[key], rtol=1e-6)
    with h5py.File(prepared / TEST_SPLIT.name / "eval_input.h5", "r") as h5:
        test_trials = h5["eval_spikes_heldin"].shape[0]
    with h5py.File(layout.submission_file(tag, "test"), "r") as h5:
        assert list(h5) == [TEST_SPLIT.group] and h5[TEST_SPLIT.group]["eval_rates_heldout"].shape[0] == test_trials


def test_nlbfab_all_search_cannot_resume(prepared):
    result = run_cli(cli.sweep, "--datasets", "mc_maze_small", "--search", "2", "--resume")
    assert result.exit_code == 2 and "continue each interrupted search with 'bin/nlbfab-search" in result.output


def test_asha_first_rung_is_later_at_5_ms_unless_given():
    from nlbfab.search import SearchPlan
    assert SearchPlan(SPLIT.name, 4, {}, {}).grace_epochs == 25
    five = SearchPlan("mc_maze_small-05ms-val", 4, {}, {})
    assert five.grace_epochs == 75 and SearchPlan.from_json(five.to_json()) == five  # resumed as started
    assert SearchPlan("mc_maze_small-05ms-val", 4, {}, {}, grace_epochs=10).grace_epochs == 10


def test_a_search_its_trials_cannot_run_leaves_the_earlier_search_as_it_was(searched, homes):
    import ray
    folder = searched[1]
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and "tune" not in p.parts}
    refused = run_cli(cli.search, "--split", SPLIT.name, "--trials", "2", "--run-tag", "srch", "--accelerator", "gpu")
    assert refused.exit_code == 2 and "--accelerator is not for nlbfab-search's trials" in refused.stderr
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for options, message in [(("--precision", "16-mixed"), "--precision 16-mixed needs a GPU"),
                                 (("--gpus-per-trial", "0.5"), "--gpus-per-trial 0.5: the Ray cluster has 0 GPUs"),
                                 (("--cpus-per-trial", "3"), "--cpus-per-trial 3: the Ray cluster has 2 CPUs")]:
            result = run_cli(cli.search, "--split", SPLIT.name, "--trials", "2", "--run-tag", "srch", *options)
            assert result.exit_code == 2 and message in result.stderr, result.output
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    finally:
        ray.shutdown()
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and "tune" not in p.parts} == before
