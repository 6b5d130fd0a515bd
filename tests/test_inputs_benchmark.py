"""benchmarks/inputs.py: its lags, decoder and peak ratio on made-up inputs, and on a trained
LFADS run the best checkpoint's parameters (those that made the submission) against the eval
windows' pulses; and benchmarks/hook_cost.py, which times the inputs hook too."""
from __future__ import annotations

import json
import sys

import h5py
import numpy as np
import pytest
import torch

from benchmarks import inputs as benchmark
from nlbfab import cli
from nlbfab.data import load_split
from nlbfab.layout import Homes, submission_file
from nlbfab.models import get_model
from nlbfab.splits import DATASETS, get_split
from nlbfab.synth_nwb import synthesize
from tests.conftest import run_cli

BIN_MS = 20


def test_lagged_puts_each_bins_neighbours_beside_it():
    x = np.arange(1, 5, dtype=float).reshape(1, 4, 1)  # one trial: 1 2 3 4
    np.testing.assert_array_equal(benchmark.lagged(x, -1, 1)[0], [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 0]])


@pytest.fixture
def kicks_and_pulses():
    """Sparse kicks in 3 input dims and their responses, which peak a bin after each kick."""
    rng = np.random.default_rng(0)
    trials, bins, dims = 200, 40, 3
    kicks = np.where(rng.random((trials, bins, dims)) < 0.05, rng.normal(0, 1, (trials, bins, dims)), 0)
    pulses = np.zeros_like(kicks)
    for lag, weight in enumerate([0.5, 1.0, 0.6, 0.3]):
        pulses[:, lag:] += weight * kicks[:, :bins - lag]
    return kicks, pulses


def test_inputs_that_mix_the_kicks_explain_the_pulses_and_unrelated_ones_do_not(kicks_and_pulses):
    kicks, pulses = kicks_and_pulses
    rng = np.random.default_rng(1)
    mixed = kicks @ rng.normal(size=(3, 4)) + rng.normal(0, 0.05, kicks.shape[:2] + (4,))  # 4 inputs, mixed
    assert benchmark.decoding_r2(mixed, pulses, BIN_MS) > 0.8
    assert abs(benchmark.decoding_r2(rng.normal(size=mixed.shape), pulses, BIN_MS)) < 0.05


def test_the_peak_ratio_is_the_inputs_size_after_a_kick_over_their_quiet_size(kicks_and_pulses):
    kicks, _ = kicks_and_pulses
    inputs = np.ones(kicks.shape[:2] + (4,))  # size 1 everywhere ...
    inputs[np.linalg.norm(kicks, axis=-1) > 0] = 3.0  # ... and 3 in the bin of a kick
    assert benchmark.peak_ratio(inputs, kicks, BIN_MS) == pytest.approx(3.0)


def test_a_trained_runs_best_inputs_are_scored_against_its_eval_windows(tmp_path, monkeypatch):
    homes = Homes(tmp_path / "dandi", tmp_path / "prep", tmp_path / "runs")
    for variable, path in (("DATA_HOME", homes.data), ("PREP_HOME", homes.prep), ("RUNS_HOME", homes.runs)):
        monkeypatch.setenv(variable, str(path))
    synthesize(DATASETS["mc_maze"], homes.data, "tiny", 0, "realistic")
    split = get_split("mc_maze-20ms-val")
    assert run_cli(cli.prep, "--split", split.name).exit_code == 0
    trained = run_cli(cli.train, "--split", split.name, "--model", "lfads", "--max-epochs", "2", "--quiet",
                      "--run-tag", "tiny", "--gen-dim", "16", "--fac-dim", "4", "--co-dim", "3")
    assert trained.exit_code == 0, trained.output
    run_cli(cli.train, "--split", split.name, "--max-epochs", "1", "--quiet", "--run-tag", "sae")  # infers no inputs
    # the parameters read back are the ones that made the submission
    name, params = benchmark.best_params(homes.runs / "tiny" / split.name)
    data = load_split(split, homes)
    with torch.no_grad():
        logrates, _ = get_model(name).submission_apply_members([params], data.eval_heldin, data.fwd_steps)
    with h5py.File(submission_file(homes.runs / "tiny", "val")) as h5:
        np.testing.assert_allclose(logrates[0, :, :data.bins, data.heldin:].exp().numpy(),
                                   h5[split.group]["eval_rates_heldout"][()], rtol=1e-4)
    (row,) = benchmark.input_rows(homes, ["mc_maze"], [20], seed=0)
    assert (row["split"], row["run"], row["inputs"]) == (split.name, "tiny", 3)
    assert np.isfinite([row["R2"], row["R2 shuffled"], row["peak x"]]).all()


def test_hook_cost_times_every_hook_and_lfads_inferred_inputs(prepared, monkeypatch, tmp_path):
    from benchmarks import common, hook_cost
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["hook_cost.py", "--model", "lfads", "--repeats", "1"])
    hook_cost.main()
    rows = {row["what"]: row["seconds"] for row in json.loads((tmp_path / "hook_cost.json").read_text())["rows"]}
    assert set(rows) == {"training epoch", "predict all trials", "predict all trials, inferred inputs too",
                         "evaluation_hook", "raster_hook", "trajectory_hook", "inputs_hook"}
    assert all(seconds > 0 for seconds in rows.values())
