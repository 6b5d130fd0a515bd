"""benchmarks/forecast.py: on realistic data its windows are the oracle's, and its forecast keeps
the oracle's window while predicting the forward bins from the past alone."""
from __future__ import annotations

import pytest

from benchmarks.forecast import forecast_rows
from nlbfab import cli
from nlbfab.layout import Homes
from nlbfab.splits import DATASETS
from nlbfab.synth_nwb import synthesize
from tests.conftest import run_cli


@pytest.mark.parametrize("name", ["mc_maze", "area2_bump"])
def test_references_sit_on_the_oracles_windows(tmp_path, monkeypatch, name):
    homes = Homes(tmp_path / "dandi", tmp_path / "prep", tmp_path / "runs")
    for variable, path in (("DATA_HOME", homes.data), ("PREP_HOME", homes.prep), ("RUNS_HOME", homes.runs)):
        monkeypatch.setenv(variable, str(path))
    synthesize(DATASETS[name], homes.data, "tiny", 0, "realistic")
    split = f"{name}-20ms-val"
    assert run_cli(cli.prep, "--split", split).exit_code == 0
    assert run_cli(cli.baseline, "--split", split, "--method", "oracle", "--run-tag", "oracle").exit_code == 0
    rows = {r["prediction"]: r for r in forecast_rows(homes, [name], [20], samples=50, seed=0)}
    assert set(rows) == {"oracle", "condition path", "forecast"}
    assert rows["forecast"]["co-bps"] == pytest.approx(rows["oracle"]["co-bps"])  # the true window
    assert rows["forecast"]["fp-bps"] != pytest.approx(rows["oracle"]["fp-bps"])
    assert rows["condition path"]["co-bps"] < rows["oracle"]["co-bps"]
