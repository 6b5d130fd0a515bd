"""nlbfab-all: splits spread over local slots, longest first; crashes reported; resume; the
submission files checked at the end."""
import os
import shutil
import signal
import subprocess
import threading

import h5py
import pytest

from nlbfab import cli
from nlbfab.splits import get_split
from nlbfab.layout import read_metrics, run_state
from nlbfab import sweep as sw
from nlbfab.sweep import Run, local_slots, longest_first, progress_table
from tests.conftest import run_cli

QUICK = ["--max-epochs", "2", "--hidden-size", "8", "--log-every-n-epochs", "100", "--workers", "2"]


def test_longest_splits_come_first():
    names = ["mc_maze_small-20ms-val", "mc_maze-05ms-test", "dmfc_rsg-20ms-val", "mc_maze-20ms-val"]
    ordered = [s.name for s in longest_first([get_split(n) for n in names])]
    assert ordered[0] == "mc_maze-05ms-test" and ordered[-1] == "mc_maze_small-20ms-val"


def test_the_prep_command_for_missing_splits_is_as_short_as_it_can_be():
    maze = [s for s in sw.ALL_SPLITS if s.dataset.name == "mc_maze"]
    assert sw.prep_arguments(list(sw.ALL_SPLITS)) == "--all"
    assert sw.prep_arguments([get_split("mc_rtt-20ms-val"), *maze]) == "--dataset mc_maze --split mc_rtt-20ms-val"
    assert sw.prep_arguments(maze[:3]) == " ".join(f"--split {s.name}" for s in maze[:3])


def test_slots_pin_gpus_or_divide_the_cores():
    gpu = local_slots(gpus=2, jobs_per_gpu=3, workers=1, cpus=16)
    assert len(gpu) == 6 and {s.env["CUDA_VISIBLE_DEVICES"] for s in gpu} == {"0", "1"}
    cpu = local_slots(gpus=0, jobs_per_gpu=3, workers=4, cpus=16)
    assert len(cpu) == 4 and all(s.env["OMP_NUM_THREADS"] == "4" and s.accelerator == "cpu" for s in cpu)


def test_the_live_table_shows_val_co_bps_and_the_test_phases_loss_in_their_own_columns(tmp_path):
    def run(name, best):
        progress = {"epoch": 9, "best": best, "best_epoch": 7, "max_epochs": 400, "device": "cpu"}
        return Run(get_split(name), tmp_path / name, status="running", progress=progress)

    table = progress_table([run("mc_maze-20ms-val", 0.3512), run("mc_maze-20ms-test", -0.1501),
                            Run(get_split("mc_maze-05ms-val"), tmp_path)])
    header, val, test, waiting = [line.split() for line in table.splitlines()]
    assert header[4:7] == ["co-bps", "val", "loss"]
    assert val[3:6] == ["10/400", "0.3512", "-"]
    assert test[3:6] == ["10/400", "-", "0.1501"]
    assert waiting[2:6] == ["waiting", "-", "-", "-"]


def test_in_a_log_the_table_is_printed_as_statuses_change_and_every_minute_between(tmp_path):
    import io
    now, log = [0.0], io.StringIO()
    show = sw.live_table(3, log, every=60, clock=lambda: now[0])
    run = Run(get_split("mc_maze-20ms-val"), tmp_path, status="running",
              progress={"epoch": 0, "best": 0.1, "best_epoch": 0, "max_epochs": 400, "device": "cpu"})
    show([run])
    for epoch, seconds in ((1, 20), (2, 59), (3, 61), (4, 100), (5, 125)):
        now[0], run.progress["epoch"] = seconds, epoch
        show([run])
    run.status = "done"
    show([run])
    printed = [table.splitlines()[1].split()[2:4] for table in log.getvalue().strip().split("\n\n")]
    assert printed == [["running", "1/400"], ["running", "4/400"], ["running", "6/400"], ["done", "6/400"]]


def test_with_ensemble_top_a_test_run_starts_once_its_val_run_has_ended(tmp_path, monkeypatch):
    splits = [get_split(n) for n in ("mc_rtt-20ms-val", "mc_rtt-20ms-test", "mc_maze-20ms-test")]
    runs = sw.plan_runs(splits, tmp_path, resume=False, val_first=True)
    by_name = {r.split.name: r for r in runs}
    assert runs[0].split.name == "mc_maze-20ms-test" and runs[1].split.name == "mc_rtt-20ms-test"  # longest first
    assert by_name["mc_rtt-20ms-test"].after is by_name["mc_rtt-20ms-val"] and by_name["mc_maze-20ms-test"].after is None
    assert all(r.after is None for r in sw.plan_runs(splits, tmp_path, resume=False))

    events = []  # each run takes two polls; three slots, so only the order of readiness holds the test run back
    monkeypatch.setattr(sw, "_start", lambda run, slot, *_: (events.append(("start", run.split.name)),
                                                              setattr(run, "status", "running")))

    def poll(run):
        run.progress["polls"] = run.progress.get("polls", 0) + 1
        if run.progress["polls"] < 2:
            return False
        run.status = "done"
        events.append(("end", run.split.name))
        return True
    monkeypatch.setattr(sw, "_poll", poll)
    sw.run_local(runs, local_slots(0, 1, 3, 3), "tag", [], lambda _: None, interval=0)
    assert events.index(("start", "mc_rtt-20ms-test")) > events.index(("end", "mc_rtt-20ms-val"))
    assert events[:2] == [("start", "mc_maze-20ms-test"), ("start", "mc_rtt-20ms-val")]
    assert all(r.status == "done" for r in runs)


def test_a_sweep_killed_with_sigterm_stops_its_runs(tmp_path, monkeypatch):
    """A batch system's time limit or a supervisor sends SIGTERM: the runs must not be orphaned,
    to train on beside the ones a --resume starts."""
    runs = sw.plan_runs([get_split("mc_rtt-20ms-val")], tmp_path, resume=False)

    def start(run, *_):
        run.process, run.status = subprocess.Popen(["sleep", "60"]), "running"
    monkeypatch.setattr(sw, "_start", start)
    monkeypatch.setattr(sw, "_poll", lambda run: False)
    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    with pytest.raises(KeyboardInterrupt):
        sw.run_local(runs, local_slots(0, 1, 1, 1), "tag", [], lambda _: None, interval=0.05)
    assert runs[0].process.wait(timeout=5) == -signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_sweep_interrupted_as_a_run_starts_still_stops_the_others(tmp_path, monkeypatch):
    runs = sw.plan_runs([get_split(n) for n in ("mc_rtt-20ms-val", "mc_rtt-20ms-test")], tmp_path, resume=False)

    def start(run, *_):
        if any(r.process is not None for r in runs):  # the second run: Ctrl-C before its process exists
            raise KeyboardInterrupt
        run.process, run.status = subprocess.Popen(["sleep", "60"]), "running"
    monkeypatch.setattr(sw, "_start", start)
    with pytest.raises(KeyboardInterrupt):
        sw.run_local(runs, local_slots(0, 1, 2, 2), "tag", [], lambda _: None, interval=0.05)
    started = next(r for r in runs if r.process is not None)
    assert started.process.wait(timeout=5) == -signal.SIGTERM


def test_a_sweep_with_ensemble_top_takes_each_val_runs_choice_on_the_test_phase(prepared, homes):
    result = run_cli(cli.sweep, "--datasets", "mc_rtt", "--bins", "20", "--run-tag", "top", "--ensemble", "3",
                     "--ensemble-top", "1", *QUICK)
    assert result.exit_code == 0, result.output
    runs = homes["RUNS_HOME"] / "top"
    chosen = {phase: [m["member"] for m in read_metrics(runs / f"mc_rtt-20ms-{phase}")["ensemble"]["members"] if m["chosen"]]
              for phase in ("val", "test")}
    assert len(chosen["val"]) == 1 and chosen["test"] == chosen["val"]
    assert "chosen by the val run" in (runs / "mc_rtt-20ms-test" / "train.log").read_text()


def test_a_sweep_fills_both_submission_files_and_resume_skips_finished(prepared, homes):
    result = run_cli(cli.sweep, "--datasets", "mc_rtt", "--bins", "20", "--run-tag", "sweep", *QUICK)
    assert result.exit_code == 0, result.output
    runs = homes["RUNS_HOME"] / "sweep"
    for phase in ("val", "test"):
        with h5py.File(runs / f"submission-{phase}.h5") as h5:
            assert list(h5) == ["mc_rtt_20"]
    assert "mc_rtt-20ms-val" in result.output and "submission problem" not in result.output
    assert run_state(runs / "mc_rtt-20ms-val") == "finished"

    again = run_cli(cli.sweep, "--datasets", "mc_rtt", "--bins", "20", "--run-tag", "sweep", "--resume", *QUICK)
    assert again.exit_code == 0, again.output
    assert again.output.count("skipped") >= 2


def test_a_crashing_split_is_reported_and_the_others_go_on(prepared, homes, tmp_path, monkeypatch):
    broken = tmp_path / "prep"
    for name in ("area2_bump-20ms-val", "area2_bump-20ms-test"):
        shutil.copytree(prepared / name, broken / name)
    (broken / "area2_bump-20ms-test" / "train_input.h5").unlink()  # looks prepared, cannot load
    monkeypatch.setenv("PREP_HOME", str(broken))
    result = run_cli(cli.sweep, "--datasets", "area2_bump", "--bins", "20", "--run-tag", "crash", *QUICK)
    assert result.exit_code == 1
    runs = homes["RUNS_HOME"] / "crash"
    assert f"FAILED area2_bump-20ms-test (exit 2): see {runs / 'area2_bump-20ms-test' / 'train.log'}" in result.output
    assert "missing" in (runs / "area2_bump-20ms-test" / "train.log").read_text()
    assert "submission: none of the test phase (no test split finished)" in result.output
    assert f"submission: {runs / 'submission-val.h5'}" in result.output
    with h5py.File(runs / "submission-val.h5") as h5:
        assert list(h5) == ["area2_bump_20"]


def test_training_options_are_checked_before_anything_runs(prepared, homes):
    result = run_cli(cli.sweep, "--datasets", "mc_rtt", "--max-epoch", "2")
    assert result.exit_code == 2 and "no such option --max-epoch (did you mean --max-epochs?)" in result.output
    result = run_cli(cli.sweep, "--datasets", "mc_rt")
    assert result.exit_code == 2 and "unknown dataset mc_rt" in result.output
    for option, value, what in (("--datasets", "", "dataset"), ("--phases", ",", "phase"), ("--bins", " ", "bin width")):
        result = run_cli(cli.sweep, option, value)  # an empty shell variable would have meant all 28 splits
        assert result.exit_code == 2 and f"error: no {what} named in" in result.output, result.output


def test_the_ray_backend_runs_splits_on_a_local_ray_instance(prepared, homes):
    import ray  # installed by make test (the [ray] extra)

    assert ray.__version__
    result = run_cli(cli.sweep, "--datasets", "mc_maze_small", "--bins", "20", "--run-tag", "ray", "--backend", "ray",
                     *QUICK[:-2])
    assert result.exit_code == 0, result.output
    assert "ray-cpu" in result.output
    for phase in ("val", "test"):
        with h5py.File(homes["RUNS_HOME"] / "ray" / f"submission-{phase}.h5") as h5:
            assert list(h5) == ["mc_maze_small_20"]


@pytest.mark.parametrize("address, message", [("127.0.0.1:1", "no Ray cluster answers there"),
                                              ("head-without-port", "give host:port")])
def test_a_ray_address_nothing_answers_at_is_one_line_before_any_run(prepared, homes, address, message):
    result = run_cli(cli.sweep, "--datasets", "mc_rtt", "--bins", "20", "--phases", "val", "--backend", "ray",
                     "--address", address, "--run-tag", "unreached")
    assert result.exit_code == 2 and result.stderr.startswith(f"error: --address {address}: ")
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (homes["RUNS_HOME"] / "unreached").exists()


def test_train_test_heldin_has_the_val_runs_test_splits_prepared(prepared, homes, tmp_path, monkeypatch):
    shutil.copytree(prepared / "mc_rtt-20ms-val", tmp_path / "mc_rtt-20ms-val")
    monkeypatch.setenv("PREP_HOME", str(tmp_path))
    result = run_cli(cli.sweep, "--datasets", "mc_rtt", "--bins", "20", "--phases", "val", "--run-tag", "needs-test",
                     "--no-prep", "--train-test-heldin", *QUICK)
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "error: 1 split(s) not preprocessed: run 'bin/nlbfab-prep --split mc_rtt-20ms-test'"]
    assert not (homes["RUNS_HOME"] / "needs-test").exists()


@pytest.mark.parametrize("address, cpus", [("local", 1), (None, None), ("auto", None)])
def test_a_new_local_ray_instance_has_the_cores_this_process_may_use(monkeypatch, address, cpus):
    """Under taskset or a batch job's allocation Ray would count every core of the machine, and
    nlbfab-search run one trial per core it may not use."""
    import ray
    from nlbfab import ray_cluster
    seen = {}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(ray, "init", lambda address=None, **options: seen.update(options))
    ray_cluster.init(address, include_dashboard=False)
    assert seen.get("num_cpus") == cpus  # None may join a cluster (RAY_ADDRESS), which refuses a count
