"""The benchmark scripts hold nlbfab's standard for bad input: one ``error:`` line, exit status 2,
no traceback and no work done; ``--help`` describes each script in a whole sentence."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(tmp_path, script: str, *args: str) -> subprocess.CompletedProcess:
    homes = {name: str(tmp_path / name.lower()) for name in ("DATA_HOME", "PREP_HOME", "RUNS_HOME")}
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **homes}, timeout=300)


@pytest.mark.parametrize("script, args, says", [
    ("hook_cost.py", ["--split", "mc_maze-07ms-val"], "unknown split 'mc_maze-07ms-val'"),
    ("hook_cost.py", ["--repeats", "0"], "must be 1 or more"),
    ("train_throughput.py", ["--bins", "7", "--compile", "no"], "invalid choice: 7"),
    ("ensemble.py", ["--step-cost", "--members", "1"], "give --members 2 or more"),
    ("models.py", ["--max-epochs", "0"], "must be 1 or more"),  # 0 was taken as no cap: full-length runs
    ("models.py", ["--models", "nonesuch", "--scale", "tiny"], "unknown model 'nonesuch'"),
    ("time_to_quality.py", ["--epochs", "0"], "must be 1 or more"),
    ("gpu_check.py", ["--cpu", "--epochs", "2"], "--epochs must be 3 or more"),  # 2 failed its own loss check
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, script, args, says):
    done = _run(tmp_path, script, "--workdir", str(tmp_path / "work"), *args) if script == "models.py" \
        else _run(tmp_path, script, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and says in errors[0], done.stderr
    assert not (tmp_path / "work").exists()  # checked before any work


@pytest.mark.parametrize("script", ["ensemble.py", "models.py", "sweep.py", "time_to_quality.py", "search.py"])
def test_help_describes_the_script_in_whole_sentences(tmp_path, script):
    done = _run(tmp_path, script, "--help")
    assert done.returncode == 0
    first_paragraph = done.stdout.split("\n\n")[1]  # after the usage
    assert " ".join(first_paragraph.split()).endswith("."), first_paragraph
