"""Shared fixtures: tiny synthetic datasets for all 7 NLB datasets, preprocessed into all 28
splits once per test session, with DATA_HOME/PREP_HOME/RUNS_HOME pointing into a temp folder."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from nlbfab import cli, config
from nlbfab.layout import Homes


@pytest.fixture(scope="session")
def homes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nlbfab")
    env = {"DATA_HOME": root / "dandi", "PREP_HOME": root / "prep", "RUNS_HOME": root / "runs"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def homes_with(**paths) -> Homes:
    """The session's homes (the environment the ``homes`` fixture set), some replaced, e.g.
    ``homes_with(prep=tmp_path)``."""
    return replace(config.homes(), **paths)


def run_cli(command, *args):
    """Run a click command in-process; returns click's Result (exit_code, output, stderr)."""
    return CliRunner().invoke(command, list(args))


@pytest.fixture(scope="session")
def synthetic(homes) -> Path:
    """All 7 datasets at --scale tiny in DATA_HOME."""
    result = run_cli(cli.synth, "--all", "--scale", "tiny", "--seed", "0")
    assert result.exit_code == 0, result.output
    return homes["DATA_HOME"]


@pytest.fixture(scope="session")
def prepared(synthetic, homes) -> Path:
    """All 28 splits preprocessed into PREP_HOME."""
    result = run_cli(cli.prep, "--all")
    assert result.exit_code == 0, result.output
    return homes["PREP_HOME"]
