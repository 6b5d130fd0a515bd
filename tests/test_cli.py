"""Commands fail on bad input with one line that says what to do, and no traceback."""
import sys

import pytest

from nlbfab import cli, download
from nlbfab.splits import DATASETS
from tests.conftest import run_cli


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.output.strip().endswith(errors[0]), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0]


def test_download_without_the_dandi_client_says_how_to_install_it(homes, monkeypatch):
    monkeypatch.setitem(sys.modules, "dandi", None)  # import dandi fails as if not installed
    monkeypatch.setitem(sys.modules, "dandi.download", None)
    one_line_error(run_cli(cli.download, "--dataset", "mc_maze"), "pip install -e .[dandi]")


def test_download_offline_fails_at_once_with_a_clear_message(homes, monkeypatch):
    monkeypatch.setattr(download, "_dandi_download", lambda: pytest.fail("offline: must not start the client"))
    monkeypatch.setattr(download, "DANDI_API_HOST", "dandi.invalid")  # never resolves (RFC 6761)
    monkeypatch.setattr(download, "_dandi_download", lambda: None)
    one_line_error(run_cli(cli.download, "--dataset", "mc_maze"), "cannot reach DANDI",
                   "nlbfab-synth --dataset mc_maze")


def test_a_failing_transfer_is_reported_in_one_line(homes, monkeypatch):
    def dropped(urls, output_dir):
        assert urls == ["DANDI:000128/0.220113.0400"]
        raise ConnectionError("Connection reset by peer")
    monkeypatch.setattr(download, "_dandi_download", lambda: dropped)
    monkeypatch.setattr(download.socket, "getaddrinfo", lambda *a: [])
    one_line_error(run_cli(cli.download, "--dataset", "mc_maze"), "could not download mc_maze from DANDI",
                   "nlbfab-synth --dataset mc_maze")


def test_prep_needs_something_to_do(homes):
    one_line_error(run_cli(cli.prep), "--split")


def test_synth_rejects_an_unknown_dataset(homes):
    one_line_error(run_cli(cli.synth, "--dataset", "mc_mazee"), "did you mean mc_maze")


def test_synth_skips_a_dataset_it_already_made(synthetic):
    result = run_cli(cli.synth, "--dataset", "mc_rtt", "--scale", "tiny", "--seed", "0")
    assert result.exit_code == 0 and "already synthesized" in result.output


def test_a_baseline_of_an_unprepared_split_says_which_prep_to_run(homes, tmp_path, monkeypatch):
    monkeypatch.setenv("PREP_HOME", str(tmp_path))
    one_line_error(run_cli(cli.baseline, "--split", "mc_rtt-05ms-val"), "bin/nlbfab-prep --split mc_rtt-05ms-val")


def test_a_missing_env_variable_is_named(homes, monkeypatch):
    monkeypatch.setenv("PREP_HOME", "")
    one_line_error(run_cli(cli.prep, "--split", "mc_maze-20ms-val"), "PREP_HOME is not set")


@pytest.mark.parametrize("name", ["synth", "prep", "download", "baseline", "train", "scores"])
def test_bin_scripts_run_the_commands(name):
    import subprocess
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "bin" / f"nlbfab-{name}"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and f"nlbfab-{name}" in done.stdout


def test_every_dataset_has_a_dandi_url():
    assert {download.dandi_url(d).split("/")[0] for d in DATASETS.values()} == {
        "DANDI:000128", "DANDI:000129", "DANDI:000127", "DANDI:000130", "DANDI:000138", "DANDI:000139", "DANDI:000140"}
