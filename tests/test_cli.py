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


def test_download_without_the_dandi_client_says_how_to_install_it(homes, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "dandi", None)  # import dandi fails as if not installed
    monkeypatch.setitem(sys.modules, "dandi.download", None)
    monkeypatch.setenv("DATA_HOME", str(tmp_path / "dandi"))
    result = run_cli(cli.download, "--dataset", "mc_maze")
    one_line_error(result, "pip install -e .[dandi]")
    assert result.output.count("\n") == 1 and not (tmp_path / "dandi").exists()  # nothing said or made first


def test_download_offline_fails_at_once_with_a_clear_message(homes, monkeypatch, tmp_path):
    monkeypatch.setattr(download, "DANDI_API_HOST", "dandi.invalid")  # never resolves (RFC 6761)
    monkeypatch.setattr(download, "_dandi_download", lambda: None)
    monkeypatch.setenv("DATA_HOME", str(tmp_path / "dandi"))
    result = run_cli(cli.download, "--dataset", "mc_maze")
    one_line_error(result, "cannot reach DANDI", "nlbfab-synth --dataset mc_maze")
    assert result.output.count("\n") == 1 and not (tmp_path / "dandi").exists()


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


def test_a_variable_exported_empty_is_named(homes, monkeypatch):
    monkeypatch.setenv("PREP_HOME", "")
    one_line_error(run_cli(cli.prep, "--split", "mc_maze-20ms-val"),
                   "PREP_HOME is set to nothing in the environment: export PREP_HOME=... or unset PREP_HOME")


@pytest.mark.parametrize("name", ["synth", "prep", "download", "baseline", "train", "scores", "submit", "all"])
def test_bin_scripts_run_the_commands(name):
    import subprocess
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "bin" / f"nlbfab-{name}"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and f"nlbfab-{name}" in done.stdout


def test_the_demo_explains_itself_and_refuses_arguments():
    import subprocess
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "bin" / "nlbfab-demo"
    helped = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=10)
    assert helped.returncode == 0 and "NLBFAB_DEMO_SPLIT" in helped.stdout
    refused = subprocess.run([str(script), "--split", "x"], capture_output=True, text=True, timeout=10)
    assert refused.returncode == 2 and refused.stderr.startswith("error:") and len(refused.stderr.splitlines()) == 1


def test_every_dataset_has_a_dandi_url():
    assert {download.dandi_url(d).split("/")[0] for d in DATASETS.values()} == {
        "DANDI:000128", "DANDI:000129", "DANDI:000127", "DANDI:000130", "DANDI:000138", "DANDI:000139", "DANDI:000140"}


BAD_VALUES = [("--hidden-size", "0", ">= 1"), ("--batch-size", "0", ">= 1"), ("--learning-rate", "-1", "> 0"),
              ("--learning-rate", "0", "> 0"), ("--weight-decay", "-0.1", ">= 0"), ("--dropout", "1.5", "in [0, 1)"),
              ("--dropout", "-0.1", "in [0, 1)"), ("--grad-clip", "-1", ">= 0"), ("--seed", "-1", "in [0, 4294967295]"),
              ("--max-epochs", "0", ">= 1"), ("--patience", "0", ">= 1"), ("--lr-decay", "0", "in (0, 1]"),
              ("--lr-decay", "1.5", "in (0, 1]"), ("--lr-patience", "0", ">= 1"), ("--min-lr", "-1", ">= 0"),
              ("--log-every-n-epochs", "0", ">= 1"), ("--learning-rate", "nan", "> 0"),
              ("--average-decay", "1", "in [0, 1)"),
              ("--devices", "0", "positive number"), ("--run-tag", "a/b", "names a folder"),
              ("--precision", "64", "'32-true'"), ("--accelerator", "tpu", "'cuda'"), ("--hidden-size", "abc", "integer")]


@pytest.mark.parametrize("option, value, valid", BAD_VALUES)
def test_every_training_option_is_checked_before_any_work(homes, option, value, valid):
    one_line_error(run_cli(cli.train, "--split", "mc_rtt-20ms-val", option, value), option, value, valid)


def test_a_misspelt_option_names_the_models_hyperparameters(homes):
    one_line_error(run_cli(cli.train, "--split", "mc_rtt-20ms-val", "--hidden-sise", "64"),
                   "no such option --hidden-sise", "model sae's hyperparameters (--hidden-size)")


def test_a_min_lr_at_or_above_the_learning_rate_is_refused(homes):
    one_line_error(run_cli(cli.train, "--split", "mc_rtt-20ms-val", "--learning-rate", "1e-3", "--min-lr", "1e-3"),
                   "--min-lr", "below --learning-rate")


def test_nlbfab_all_checks_the_training_options_it_passes_on(homes, tmp_path, monkeypatch):
    monkeypatch.setenv("RUNS_HOME", str(tmp_path / "runs"))
    one_line_error(run_cli(cli.sweep, "--datasets", "mc_rtt", "--grad-clip", "-1"), "--grad-clip -1", ">= 0")
    one_line_error(run_cli(cli.sweep, "--datasets", "mc_rtt", "--jobs-per-gpu", "0"), "--jobs-per-gpu")
    assert not (tmp_path / "runs").exists()


def test_an_accelerator_that_is_not_there_names_those_that_are_and_how_to_get_cuda(prepared, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error(run_cli(cli.train, "--split", "mc_rtt-20ms-val", "--accelerator", "gpu"),
                   "--accelerator gpu", "available: auto, cpu", "CUDA build of torch")


def test_an_option_fabric_refuses_is_one_line(prepared):
    one_line_error(run_cli(cli.train, "--split", "mc_rtt-20ms-val", "--accelerator", "cpu", "--strategy", "nonsense"),
                   "--strategy nonsense", "invalid strategy")


def test_a_mixed_precision_run_refused_says_one_line_and_nothing_of_fabrics(prepared):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "nlbfab.cli", "train", "--split", "mc_rtt-20ms-val", "--model", "lfads",
                           "--precision", "bf16-mixed", "--ci-lag", "1000", "--run-tag", "bf16-refused"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == "", done.stdout
    assert done.stderr.splitlines() == ["error: --ci-lag 1000: must be below the split's 30 observed bins"], done.stderr


def test_a_runs_home_that_cannot_be_created_is_named_with_where_it_was_set(prepared, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("RUNS_HOME", str(blocker / "runs"))
    one_line_error(run_cli(cli.train, "--split", "mc_rtt-20ms-val"), "RUNS_HOME=", "the environment", "writable")
    env_file = tmp_path / "custom.env"
    env_file.write_text(f"RUNS_HOME={blocker / 'runs'}\n")
    monkeypatch.delenv("RUNS_HOME")
    monkeypatch.setenv("NLBFAB_ENV_FILE", str(env_file))
    one_line_error(run_cli(cli.baseline, "--split", "mc_rtt-20ms-val"), "RUNS_HOME=", str(env_file))


def test_a_missing_prep_home_or_data_home_says_what_makes_it(homes, tmp_path, monkeypatch):
    monkeypatch.setenv("PREP_HOME", str(tmp_path / "nowhere"))
    one_line_error(run_cli(cli.train, "--split", "mc_rtt-20ms-val"), "PREP_HOME=", "the environment",
                   "bin/nlbfab-prep --split mc_rtt-20ms-val")
    monkeypatch.setenv("DATA_HOME", str(tmp_path / "nothing"))
    one_line_error(run_cli(cli.prep, "--split", "mc_rtt-20ms-val"), "DATA_HOME=", "bin/nlbfab-synth --dataset mc_rtt")
    assert not (tmp_path / "nowhere").exists()


def test_float16_on_a_cpu_is_refused_rather_than_run_as_bfloat16(prepared):
    one_line_error(run_cli(cli.train, "--split", "mc_rtt-20ms-val", "--accelerator", "cpu", "--precision", "16-mixed"),
                   "--precision 16-mixed needs a GPU", "bf16-mixed")


def test_more_cpu_processes_than_cores_are_refused_before_any_starts(prepared):
    import os
    too_many = str((os.cpu_count() or 1) + 1)
    one_line_error(run_cli(cli.train, "--split", "mc_rtt-20ms-val", "--accelerator", "cpu", "--devices", too_many),
                   f"--devices {too_many} on the CPU starts {too_many} training processes", "or fewer")


def test_cpu_processes_count_the_cores_the_process_may_use_not_the_machines(prepared, monkeypatch):
    import os
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # as under taskset -c 0
    one_line_error(run_cli(cli.train, "--split", "mc_rtt-20ms-val", "--accelerator", "cpu", "--devices", "2"),
                   "more than the 1 cores this process may use: use --devices 1 or fewer")


@pytest.mark.parametrize("tag", [".", "..", "../elsewhere", "/tmp/abs", "a b"])
def test_a_run_tag_names_one_folder_in_runs_home_in_every_command(prepared, homes, tag):
    from pathlib import Path
    Path(homes["RUNS_HOME"]).mkdir(exist_ok=True)
    outside = Path(homes["RUNS_HOME"]).parent
    before = sorted(p.name for p in outside.iterdir())
    for command, args in [(cli.train, ["--split", "mc_rtt-20ms-val"]), (cli.baseline, ["--split", "mc_rtt-20ms-val"]),
                          (cli.sweep, ["--datasets", "mc_rtt", "--bins", "20", "--phases", "val"]),
                          (cli.search, ["--split", "mc_rtt-20ms-val", "--trials", "2"]), (cli.submit, [])]:
        one_line_error(run_cli(command, *args, "--run-tag", tag), f"--run-tag {tag!r}", "names a folder in RUNS_HOME")
    assert sorted(p.name for p in outside.iterdir()) == before


@pytest.mark.parametrize("options, message", [(["--precision", "16-mixed"], "--precision 16-mixed needs a GPU"),
                                              (["--strategy", "ddp_spawn"], "--strategy ddp_spawn"),
                                              (["--accelerator", "gpu"], "--accelerator is not for nlbfab-all's runs"),
                                              (["--devices", "2"], "--devices is not for nlbfab-all's runs"),
                                              (["--model", "lfads", "--with-splits", "mc_maze_small-20ms-val"],
                                               "--with-splits is not for nlbfab-all")])
def test_nlbfab_all_refuses_settings_its_runs_cannot_use_before_any_starts(prepared, homes, options, message):
    from pathlib import Path
    result = run_cli(cli.sweep, "--datasets", "mc_rtt", "--bins", "20", "--phases", "val", "--run-tag", "never", *options)
    one_line_error(result, message)
    assert not (Path(homes["RUNS_HOME"]) / "never").exists()


@pytest.mark.parametrize("command, args, message", [
    ("synth", ["--all", "--dataset", "mc_rtt"], "--all or --dataset, not both"),
    ("prep", ["--all", "--split", "mc_rtt-20ms-val"], "--all or --split, not both"),
    ("search", ["--split", "mc_rtt-20ms-val", "--no-test"], "--no-test goes with --submit-top"),
    ("sweep", ["--datasets", "mc_rtt", "--search-top", "3"], "--search-top goes with --search N")])
def test_options_that_cannot_go_together_are_refused(prepared, command, args, message):
    one_line_error(run_cli(getattr(cli, command), *args), message)


def test_the_demo_checks_its_settings_before_making_anything(tmp_path):
    import os
    import subprocess
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "bin" / "nlbfab-demo"
    env = {**os.environ, "DATA_HOME": str(tmp_path / "dandi"), "NLBFAB_DEMO_SPLIT": "area2_bump-07ms-val"}
    done = subprocess.run([str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and done.stderr.startswith("error: NLBFAB_DEMO_SPLIT=area2_bump-07ms-val")
    assert not (tmp_path / "dandi").exists()


@pytest.mark.parametrize("variable, value, message", [("TRAIN_INPUT_FILE", "eval_input.h5", "must differ"),
                                                      ("EVAL_TARGET_FILE", "../x.h5", "must be a file name")])
def test_split_file_names_must_be_three_names_in_the_split_folder(prepared, monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    one_line_error(run_cli(cli.prep, "--split", "mc_rtt-20ms-val", "--force"), f"{variable}" if "name" in message
                   else "TRAIN_INPUT_FILE, EVAL_INPUT_FILE and EVAL_TARGET_FILE", message)
