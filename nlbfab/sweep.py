"""``nlbfab-all``: train many splits at once, each run its own ``nlbfab-train`` process.

Runs are spread over local slots: ``--jobs-per-gpu`` per visible GPU (each process pinned with
``CUDA_VISIBLE_DEVICES``), or without GPUs ``--workers`` CPU processes that share the cores
(``OMP_NUM_THREADS`` divided between them). The longest splits start first so the sweep ends
sooner; a split that crashes is reported and the others go on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py

from nlbfab.splits import Split
from nlbfab.submission import expected_shapes, submission_path


@dataclass(frozen=True)
class Slot:
    """Where one run at a time executes: a name for the table and the environment to pin it."""

    name: str
    env: dict[str, str]
    accelerator: str


@dataclass
class Run:
    split: Split
    run_dir: Path
    status: str = "waiting"  # waiting, queued (Ray), running, done, failed, skipped
    slot: Slot | None = None
    process: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0
    resume: bool = False
    returncode: int | None = None
    progress: dict = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.run_dir / "train.log"


def cost(split: Split) -> int:
    """A proxy for a split's training time: trials x bins x neurons of its training tensors."""
    d = split.dataset
    return split.train_trials * (split.bins + split.forward_bins) * (d.heldin + d.heldout)


def longest_first(splits: list[Split]) -> list[Split]:
    return sorted(splits, key=cost, reverse=True)


def local_slots(gpus: int, jobs_per_gpu: int, workers: int, cpus: int) -> list[Slot]:
    """``jobs_per_gpu`` slots per GPU, else ``workers`` CPU slots with the cores divided."""
    if gpus:
        return [Slot(f"cuda:{g}", {"CUDA_VISIBLE_DEVICES": str(g)}, "gpu")
                for _ in range(jobs_per_gpu) for g in range(gpus)]
    threads = str(max(1, cpus // workers))
    return [Slot(f"cpu{k}", {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}, "cpu") for k in range(workers)]


def run_state(run_dir: Path) -> str:
    """``finished`` (metrics.json written), ``interrupted`` (a last checkpoint) or ``new``."""
    if (run_dir / "metrics.json").is_file():
        return "finished"
    return "interrupted" if (run_dir / "checkpoints" / "last.ckpt").is_file() else "new"


def _command(run: Run, run_tag: str, train_args: list[str]) -> list[str]:
    command = [sys.executable, "-m", "nlbfab.cli", "train", "--split", run.split.name, "--run-tag", run_tag,
               "--quiet", "--accelerator", run.slot.accelerator, *train_args]
    return command + (["--resume"] if run.resume else [])


def _start(run: Run, slot: Slot, run_tag: str, train_args: list[str]) -> None:
    run.slot, run.status, run.started = slot, "running", time.perf_counter()
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "progress.json").unlink(missing_ok=True)
    with open(run.log, "w") as log:
        run.process = subprocess.Popen(_command(run, run_tag, train_args), stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, **slot.env})


def _refresh(run: Run) -> None:
    """Read a run's progress.json; a queued (Ray) run counts as running once it has one."""
    try:
        run.progress = json.loads((run.run_dir / "progress.json").read_text())
        run.status = "running" if run.status == "queued" else run.status
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    run.seconds = time.perf_counter() - run.started


def _poll(run: Run) -> bool:
    """Refresh a running run's progress; True when its process has ended."""
    _refresh(run)
    code = run.process.poll()
    if code is None:
        return False
    run.returncode, run.status = code, "done" if code == 0 else "failed"
    return True


def run_local(runs: list[Run], slots: list[Slot], run_tag: str, train_args: list[str],
              show: Callable[[list[Run]], None], interval: float = 2.0) -> list[Run]:
    """Run every waiting run on the slots, longest first; ``show`` is called as things change."""
    queue = [r for r in runs if r.status == "waiting"]
    busy: dict[str, Run] = {}
    show(runs)
    try:
        while queue or busy:
            for slot in slots:
                if slot.name not in busy and queue:
                    busy[slot.name] = queue.pop(0)
                    _start(busy[slot.name], slot, run_tag, train_args)
            time.sleep(interval)
            for name, run in list(busy.items()):
                if _poll(run):
                    del busy[name]
            show(runs)
    finally:  # Ctrl-C: stop the runs; --resume continues them from their last checkpoints
        for run in busy.values():
            run.process.terminate()
    return runs


def check_submissions(runs_dir: Path, splits: list[Split], prep_home: Path, file_names: dict[str, str]) -> list[str]:
    """Problems with the sweep's submission files: a missing group or array, a wrong shape."""
    problems = []
    for phase in sorted({s.phase for s in splits}):
        path = submission_path(runs_dir, phase)
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        with h5py.File(path, "r") as h5:
            for split in [s for s in splits if s.phase == phase]:
                if split.group not in h5:
                    problems.append(f"{path.name}: no group {split.group} ({split.name})")
                    continue
                for key, shape in expected_shapes(prep_home / split.name, file_names).items():
                    if key in h5[split.group] and h5[split.group][key].shape != shape:
                        problems.append(f"{path.name}/{split.group}/{key}: {h5[split.group][key].shape} != {shape}")
                    elif key not in h5[split.group] and "forward" not in key:
                        problems.append(f"{path.name}/{split.group}: no {key}")
    return problems


def progress_table(runs: list[Run]) -> str:
    """split, device, status, epoch, best monitored value, elapsed: one line a run."""
    lines = [f"{'split':24s} {'device':7s} {'status':9s} {'epoch':>9s} {'best':>8s} {'elapsed':>8s}"]
    for run in runs:
        p = run.progress
        epoch = f"{p['epoch'] + 1}/{p['max_epochs']}" if p else "-"
        best = f"{p['best']:.4f}" if p and p["best_epoch"] >= 0 else "-"
        elapsed = f"{run.seconds:.0f} s" if run.status in ("queued", "running", "done", "failed") else "-"
        lines.append(f"{run.split.name:24s} {run.slot.name if run.slot else '-':7s} {run.status:9s} "
                     f"{epoch:>9s} {best:>8s} {elapsed:>8s}")
    return "\n".join(lines)


def summary_table(runs: list[Run]) -> str:
    """Every split's result: its val metrics (from its metrics.json), or why it has none."""
    names = ["co-bps", "vel R2", "tp corr", "psth R2", "fp-bps"]
    lines = [f"{'split':24s} {'status':8s} {'epochs':>6s} " + "".join(f"{n:>9s}" for n in names)]
    for run in runs:
        try:
            summary = json.loads((run.run_dir / "metrics.json").read_text())
        except FileNotFoundError:
            summary = {}
        metrics = summary.get("metrics", {})
        cells = "".join(f"{metrics[n]:9.4f}" if n in metrics else f"{'-':>9s}" for n in names)
        status = run.status if run.status != "done" or summary else "no-result"
        lines.append(f"{run.split.name:24s} {status:8s} {summary.get('epochs', '-'):>6} {cells}")
    return "\n".join(lines)


def _train_process(command: list[str], env: dict[str, str], log: str) -> int:
    """Body of a Ray task: one nlbfab-train process on the node Ray picked (Ray has set
    ``CUDA_VISIBLE_DEVICES`` there for the task's GPU share)."""
    with open(log, "w") as out:
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}).returncode


def run_ray(runs: list[Run], address: str | None, gpus_per_run: float | None, run_tag: str, train_args: list[str],
            paths: dict[str, str], show: Callable[[list[Run]], None], interval: float = 2.0) -> list[Run]:
    """Send every waiting run to a Ray cluster (``address``; None starts a local instance), one
    task each with ``gpus_per_run`` of a GPU (default 0.3 where the cluster has GPUs).

    The paths in ``paths`` (DATA_HOME, PREP_HOME, RUNS_HOME, ...) must be on a filesystem every
    node shares: runs read their split there and write checkpoints and submissions there."""
    import ray
    ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        if gpus_per_run is None:
            gpus_per_run = 0.3 if ray.cluster_resources().get("GPU", 0) else 0.0
        slot = Slot("ray-gpu" if gpus_per_run else "ray-cpu", {}, "gpu" if gpus_per_run else "cpu")
        task = ray.remote(_train_process).options(num_cpus=1, num_gpus=gpus_per_run)
        pending = {}
        for run in [r for r in runs if r.status == "waiting"]:
            run.slot, run.status, run.started = slot, "queued", time.perf_counter()
            run.run_dir.mkdir(parents=True, exist_ok=True)
            (run.run_dir / "progress.json").unlink(missing_ok=True)
            pending[task.remote(_command(run, run_tag, train_args), paths, str(run.log))] = run
        show(runs)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=interval)
            for ref in done:
                run = pending.pop(ref)
                run.returncode = ray.get(ref)
                run.status = "done" if run.returncode == 0 else "failed"
                run.seconds = time.perf_counter() - run.started
            for run in pending.values():
                _refresh(run)
            show(runs)
    finally:
        ray.shutdown()
    return runs
