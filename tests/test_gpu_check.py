"""benchmarks/gpu_check.py: its every check runs (on the CPU with --cpu) and passes; without a
GPU it skips, saying why; a broken GPU GRU is a FAIL row and a non-zero exit, not a crash."""
import json
import os
import re
import subprocess
import sys

import pytest

from benchmarks import gpu_check
from nlbfab.models import gru as gru_module

SCRIPT = gpu_check.__file__


def _table(stdout: str) -> dict[str, tuple[str, str]]:
    """The final table's rows, in order: check -> (status, detail)."""
    lines = stdout.splitlines()
    header = max(i for i, line in enumerate(lines) if line.split() == ["check", "status", "detail"])
    rows = {}
    for line in lines[header + 1:]:
        match = re.match(r"\s*(.+?)\s+(PASS|FAIL|SKIP)\s+(.*)$", line)
        if not match:
            break
        rows[match[1]] = (match[2], match[3].strip())
    return rows


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=600)


def test_every_check_runs_on_the_cpu_and_passes(tmp_path):
    results = tmp_path / "results.json"
    done = _run("--cpu", "--scale", "tiny", "--epochs", "3", "--trials", "32", "--workdir", str(tmp_path / "work"),
                "--json", str(results))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _table(done.stdout)
    assert list(rows) == [r.name for r in gpu_check.plan(list(gpu_check.CHECKS), cpu=True, gpus=0)]
    assert len(rows) == 23
    not_passed = {name: row for name, row in rows.items() if row[0] != "PASS"}
    assert not_passed == {"train 16-mixed": ("SKIP", "CPUs have no float16 autocast: nlbfab-train refuses 16-mixed there")}
    saved = json.loads(results.read_text())
    assert [(r["name"], r["status"]) for r in saved["rows"]] == [(name, row[0]) for name, row in rows.items()]
    throughput = [r["values"]["trials/s"] for r in saved["rows"] if r["check"] == "throughput"]
    assert len(throughput) == 9 and all(v > 0 for v in throughput)
    decoder = next(r for r in saved["rows"] if r["name"] == "lfads decoder")["values"]
    assert decoder["function_ms"] > 0 and decoder["loop_ms"] > 0 and len(decoder) == 16 + 2  # every tensor compared
    members = next(r for r in saved["rows"] if r["name"] == "lfads decoder x4")["values"]
    assert members["together_ms"] > 0 and members["in_turn_ms"] > 0 and len(members) == 16 + 2
    with_grads = next(r for r in saved["rows"] if r["name"] == "gru pair grad")["values"]
    assert {"d inputs", "d h0", "d w_ih[1]", "d b_hh[1]"} <= set(with_grads)  # every gradient compared
    assert (tmp_path / "work" / "runs" / "gpu-check-all" / "submission-test.h5").is_file()  # a given workdir is kept


def test_without_a_gpu_every_check_is_skipped_as_needing_one(tmp_path):
    done = _run("--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "results.json"), CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no CUDA GPU: every check below needs a CUDA GPU" in done.stdout
    rows = _table(done.stdout)
    assert len(rows) == 22 and set(rows.values()) == {("SKIP", "needs a CUDA GPU")}
    assert not (tmp_path / "work").exists()  # nothing was synthesized or trained
    assert {r["status"] for r in json.loads((tmp_path / "results.json").read_text())["rows"]} == {"SKIP"}


def test_the_plan_skips_only_what_the_machine_cannot_run():
    one_gpu = {r.name: (r.status, r.detail) for r in gpu_check.plan(list(gpu_check.CHECKS), cpu=False, gpus=1)}
    assert one_gpu.pop("ddp") == ("SKIP", "needs 2 or more GPUs (1 visible)")
    assert set(one_gpu.values()) == {("PENDING", "")} and "synth + prep mc_maze-20ms-val" in one_gpu
    two_gpus = gpu_check.plan(list(gpu_check.CHECKS), cpu=False, gpus=2)
    assert all(r.status == "PENDING" for r in two_gpus) and len(two_gpus) == 23
    assert [r.name for r in gpu_check.plan(["gru"], cpu=False, gpus=1)] == [
        "gru pair grad", "gru pair no_grad", "gru single grad", "gru single no_grad"]
    assert [r.check for r in gpu_check.plan(["ddp"], cpu=False, gpus=2)] == ["data", "ddp"]  # ddp trains on the split
    assert [r.check for r in gpu_check.plan(["ddp"], cpu=False, gpus=1)] == ["ddp"]


def test_a_gpu_gru_that_cannot_backpropagate_fails_its_rows_and_the_exit_status(monkeypatch, capsys, tmp_path):
    """The bug cuDNN reports as "cudnn RNN backward can only be called in training mode":
    ``aten::gru`` run with train=False while gradients are recorded (--cpu holds aten::gru to
    cuDNN's rule)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(gru_module, "fused_train_mode", lambda device, grad_enabled: False)
    options = ["--cpu", "--only", "gru", "--workdir", str(tmp_path), "--json", str(tmp_path / "gru.json")]
    assert gpu_check.main(options) == 1
    rows = _table(capsys.readouterr().out)
    for case in ("pair", "single"):
        status, detail = rows[f"gru {case} grad"]
        assert status == "FAIL"
        assert detail.startswith("RuntimeError: cudnn RNN backward can only be called in training mode")
        assert rows[f"gru {case} no_grad"][0] == "PASS"  # inference never needs the backward


def test_a_training_run_that_prints_a_torch_warning_fails_its_row(monkeypatch, tmp_path):
    """The warning cuDNN printed at every GRU call of the first GPU runs, in a command's output."""
    printed = ("Using 16-bit Automatic Mixed Precision (AMP)\n[W1204 17:11:11.345770898 RNN.cpp:1479] Warning: RNN "
               "module weights are not part of single contiguous chunk of memory. (function _cudnn_rnn)\n")
    monkeypatch.setattr(gpu_check, "run_command", lambda *args: printed)
    context = gpu_check.Context(cpu=True, scale="tiny", epochs=3, trials=32, workdir=tmp_path)
    with pytest.raises(gpu_check.CheckFailed, match=r"torch printed 1 warning\(s\), the first: \[W1204 .* RNN.cpp"):
        gpu_check.check_training(context, "sae", "32-true")
