import os
import subprocess
import sys

import pytest

from nlbfab import config
from nlbfab.errors import UserError


@pytest.fixture
def env_file(tmp_path, monkeypatch):
    for name in config.DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "project" / ".env"
    path.parent.mkdir()
    monkeypatch.setenv("NLBFAB_ENV_FILE", str(path))
    return path


def test_defaults_apply_without_an_env_file(env_file):
    assert not env_file.exists()
    assert config.split_file_names()["train_input"] == "train_input.h5"
    assert config.prep_home().name == "prep"


def test_relative_paths_in_env_are_taken_from_its_folder(env_file):
    env_file.write_text("PREP_HOME=./somewhere/prep\n")
    assert config.prep_home() == (env_file.parent / "somewhere" / "prep").resolve()


def test_relative_paths_in_the_environment_are_taken_from_the_working_directory(env_file, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATA_HOME", "here")
    assert config.data_home() == tmp_path.resolve() / "here"


def test_environment_overrides_env_file(env_file, monkeypatch, tmp_path):
    env_file.write_text(f"RUNS_HOME={tmp_path / 'from-file'}\n")
    monkeypatch.setenv("RUNS_HOME", str(tmp_path / "from-env"))
    assert config.runs_home() == tmp_path / "from-env"


def test_an_empty_variable_says_which_and_how_to_fix(env_file):
    env_file.write_text("DATA_HOME=\n")
    with pytest.raises(UserError, match=r"DATA_HOME is not set: add 'DATA_HOME=\.\.\.' to .*\.env or export DATA_HOME"):
        config.data_home()


def test_a_variable_exported_empty_says_so_since_the_env_file_cannot_help(env_file, monkeypatch):
    env_file.write_text("DATA_HOME=/data/dandi\n")
    monkeypatch.setenv("DATA_HOME", "")
    with pytest.raises(UserError, match=r"DATA_HOME is set to nothing in the environment: export DATA_HOME=\.\.\. "
                                        r"or unset DATA_HOME"):
        config.data_home()


def test_an_env_file_variable_naming_a_folder_is_one_line(env_file, monkeypatch):
    monkeypatch.setenv("NLBFAB_ENV_FILE", str(env_file.parent))
    with pytest.raises(UserError, match=r"NLBFAB_ENV_FILE=.*project is a folder: name the \.env file itself"):
        config.data_home()


def test_importing_nlbfab_never_needs_an_env_file(tmp_path):
    missing = tmp_path / "no-such" / ".env"
    code = "import nlbfab.cli, nlbfab.prep, nlbfab.oracle, nlbfab.synth_nwb, nlbfab.download"
    env = {**os.environ, "NLBFAB_ENV_FILE": str(missing), "DATA_HOME": ""}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_an_env_file_variable_exported_empty_means_no_env_file(env_file, monkeypatch, tmp_path):
    """NLBFAB_ENV_FILE= (no .env at all, as any name of no file) is not the working directory."""
    monkeypatch.setenv("NLBFAB_ENV_FILE", "")
    monkeypatch.chdir(tmp_path)
    assert config.prep_home().name == "prep"
