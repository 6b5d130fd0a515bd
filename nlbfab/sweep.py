"""``nlbfab-all``: train many splits at once, each run its own ``nlbfab-train`` process.

Runs are spread over local slots: ``--jobs-per-gpu`` per visible GPU (each process pinned with
``CUDA_VISIBLE_DEVICES``), or without GPUs ``--workers`` CPU processes that share the cores
(``OMP_NUM_THREADS`` divided between them). The longest splits start first so the sweep ends
sooner; a split that crashes is reported and the others go on.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py

from nlbfab import layout, ray_cluster
from nlbfab.cores import available_cpus
from nlbfab.errors import UserError
from nlbfab.layout import Homes
from nlbfab.models import get_model
from nlbfab.prep import is_up_to_date, prepare_splits
from nlbfab.splits import ALL_SPLITS, DATASETS, Split
from nlbfab.submission import PHASES, expected_shapes


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
    with_splits: tuple[Split, ...] = ()  # its --with-splits companions (--share-datasets)
    after: Run | None = None  # a run that must end before this one starts (its val run, for --ensemble-top)

    @property
    def log(self) -> Path:
        return layout.train_log(self.run_dir)


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


def _command(run: Run, run_tag: str, train_args: list[str]) -> list[str]:
    command = [sys.executable, "-m", "nlbfab.cli", "train", "--split", run.split.name, "--run-tag", run_tag,
               "--quiet", "--accelerator", run.slot.accelerator, *train_args]
    if run.with_splits:
        command += ["--with-splits", ",".join(s.name for s in run.with_splits)]
    return command + (["--resume"] if run.resume else [])


def _start(run: Run, slot: Slot, run_tag: str, train_args: list[str]) -> None:
    run.slot, run.status, run.started = slot, "running", time.perf_counter()
    run.run_dir.mkdir(parents=True, exist_ok=True)
    layout.clear_progress(run.run_dir)
    with open(run.log, "w") as log:
        run.process = subprocess.Popen(_command(run, run_tag, train_args), stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, **slot.env})


def _refresh(run: Run) -> None:
    """Read a run's progress; a queued (Ray) run counts as running once it has some."""
    progress = layout.read_progress(run.run_dir)
    if progress:
        run.progress = progress
        run.status = "running" if run.status == "queued" else run.status
    run.seconds = time.perf_counter() - run.started


def _poll(run: Run) -> bool:
    """Refresh a running run's progress; True when its process has ended."""
    _refresh(run)
    code = run.process.poll()
    if code is None:
        return False
    run.returncode, run.status = code, "done" if code == 0 else "failed"
    return True


def ready(run: Run) -> bool:
    """Whether a waiting run may start: the run it comes after (if any) has ended, however."""
    return run.after is None or run.after.status in ("done", "failed", "skipped")


def run_local(runs: list[Run], slots: list[Slot], run_tag: str, train_args: list[str],
              show: Callable[[list[Run]], None], interval: float = 2.0) -> list[Run]:
    """Run every waiting run on the slots, longest first of those ``ready``; ``show`` is called as
    things change."""
    queue = [r for r in runs if r.status == "waiting"]
    busy: dict[str, Run] = {}
    show(runs)
    # `kill PID` (SIGTERM: a batch system's time limit, a supervisor) ends the sweep as Ctrl-C
    # does, so that the finally below stops its runs instead of leaving them orphaned
    handles = _main_thread()  # Python sets signal handlers in the main thread only
    previous = signal.signal(signal.SIGTERM, _interrupted) if handles else None
    try:
        while queue or busy:
            for slot in slots:
                run = next((r for r in queue if ready(r)), None)
                if slot.name not in busy and run:
                    queue.remove(run)
                    busy[slot.name] = run
                    _start(run, slot, run_tag, train_args)
            time.sleep(interval)
            for name, run in list(busy.items()):
                if _poll(run):
                    del busy[name]
            show(runs)
    finally:  # Ctrl-C: stop the runs; --resume continues them from their last checkpoints
        if handles:  # a second SIGTERM must not cut this short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for run in busy.values():
            if run.process is not None:  # None: interrupted as it started
                run.process.terminate()
        if handles:  # None: a handler not set from Python, which Python cannot put back: the default
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return runs


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def check_submissions(runs_dir: Path, splits: list[Split], homes: Homes) -> list[str]:
    """Problems with the sweep's submission files: a missing group or array, a wrong shape."""
    problems = []
    for phase in sorted({s.phase for s in splits}):
        path = layout.submission_file(runs_dir, phase)
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        with h5py.File(path, "r") as h5:
            for split in [s for s in splits if s.phase == phase]:
                if split.group not in h5:
                    problems.append(f"{path.name}: no group {split.group} ({split.name})")
                    continue
                for key, shape in expected_shapes(split, homes).items():
                    if key in h5[split.group] and h5[split.group][key].shape != shape:
                        problems.append(f"{path.name}/{split.group}/{key}: {h5[split.group][key].shape} != {shape}")
                    elif key not in h5[split.group] and "forward" not in key:
                        problems.append(f"{path.name}/{split.group}: no {key}")
    return problems


def progress_table(runs: list[Run]) -> str:
    """split, device, status, epoch, the best monitored value so far, elapsed: one line a run.
    The val phase monitors val co-bps, the test phase (no held-out target) its eval trials'
    loss, whose negative the run records as its monitored value: each has a column of its own."""
    lines = [f"{'split':24s} {'device':7s} {'status':9s} {'epoch':>9s} {'co-bps':>8s} {'val loss':>8s} {'elapsed':>8s}"]
    for run in runs:
        p = run.progress
        epoch = f"{p['epoch'] + 1}/{p['max_epochs']}" if p else "-"
        best = {"co-bps": "-", "val loss": "-"}
        if p and p["best_epoch"] >= 0:
            best |= {"co-bps": f"{p['best']:.4f}"} if run.split.phase == "val" else {"val loss": f"{-p['best']:.4f}"}
        elapsed = f"{run.seconds:.0f} s" if run.status in ("queued", "running", "done", "failed") else "-"
        lines.append(f"{run.split.name:24s} {run.slot.name if run.slot else '-':7s} {run.status:9s} "
                     f"{epoch:>9s} {best['co-bps']:>8s} {best['val loss']:>8s} {elapsed:>8s}")
    return "\n".join(lines)


def live_table(height: int, stream, every: float = 60.0, clock: Callable[[], float] = time.monotonic
               ) -> Callable[[list[Run]], None]:
    """Redraw the progress table in place on a terminal; elsewhere (a batch job's log) print it
    when a status changes, and in between at most once every ``every`` seconds."""
    last = {"text": None, "printed": None, "at": clock()}

    def statuses(text: str | None) -> list[str]:
        return [line.split()[2] for line in (text or "").splitlines()]

    def show(runs: list[Run]) -> None:
        text = progress_table(runs)
        if stream.isatty():
            if last["text"] is not None:
                stream.write(f"\x1b[{height}F\x1b[J")
            stream.write(text + "\n")
        elif statuses(text) != statuses(last["printed"]) or (text != last["printed"] and clock() - last["at"] >= every):
            stream.write(text + "\n\n")
            last["printed"], last["at"] = text, clock()
        stream.flush()
        last["text"] = text
    return show


def summary_table(runs: list[Run]) -> str:
    """Every split's result: its metrics (from its run's summary: the val phase, and a synthetic
    dataset's test phase), or why it has none."""
    names = ["co-bps", "vel R2", "tp corr", "psth R2", "fp-bps"]
    lines = [f"{'split':24s} {'status':8s} {'epochs':>6s} " + "".join(f"{n:>9s}" for n in names)]
    for run in runs:
        summary = layout.read_metrics(run.run_dir)
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
    ray_cluster.init(address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        if gpus_per_run is None:
            gpus_per_run = 0.3 if ray.cluster_resources().get("GPU", 0) else 0.0
        slot = Slot("ray-gpu" if gpus_per_run else "ray-cpu", {}, "gpu" if gpus_per_run else "cpu")
        task = ray.remote(_train_process).options(num_cpus=1, num_gpus=gpus_per_run)
        pending, waiting = {}, [r for r in runs if r.status == "waiting"]

        def submit_ready() -> None:
            for run in [r for r in waiting if ready(r)]:
                waiting.remove(run)
                run.slot, run.status, run.started = slot, "queued", time.perf_counter()
                run.run_dir.mkdir(parents=True, exist_ok=True)
                layout.clear_progress(run.run_dir)
                pending[task.remote(_command(run, run_tag, train_args), paths, str(run.log))] = run

        submit_ready()
        show(runs)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=interval)
            for ref in done:
                run = pending.pop(ref)
                run.returncode = ray.get(ref)
                run.status = "done" if run.returncode == 0 else "failed"
                run.seconds = time.perf_counter() - run.started
            submit_ready()
            for run in pending.values():
                _refresh(run)
            show(runs)
    finally:
        ray.shutdown()
    return runs


@dataclass(frozen=True)
class Placement:
    """Where a sweep's runs go: this machine's GPUs or cores, or a Ray cluster."""

    backend: str = "local"  # local or ray
    jobs_per_gpu: int = 3
    workers: int | None = None  # CPU runs without GPUs; None: one per core
    address: str | None = None  # Ray; None starts a local instance
    gpus_per_run: float | None = None  # Ray; None: 0.3 where the cluster has GPUs

    def __post_init__(self):
        if self.backend == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                raise UserError("--backend ray needs Ray: run 'pip install -e .[ray]'") from None
            ray_cluster.check_reachable(self.address)


def select_splits(datasets: list[str], bins: list[str], phases: list[str]) -> list[Split]:
    """The splits of the named datasets, bin widths and phases (comma-separated names allowed;
    nothing named: all)."""
    chosen = (_names(datasets, list(DATASETS), "dataset"), _names(bins, ["5", "20"], "bin width"),
              _names(phases, list(PHASES), "phase"))
    return [s for s in ALL_SPLITS if s.dataset.name in chosen[0] and str(s.bin_ms) in chosen[1] and s.phase in chosen[2]]


def _names(values: list[str], valid: list[str], what: str) -> list[str]:
    chosen = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if values and not chosen:  # an empty shell variable: not a request for all 28 splits
        raise UserError(f"no {what} named in '{','.join(values)}': name one or more of {', '.join(valid)}, "
                        f"or leave the option out for all")
    unknown = [v for v in chosen if v not in valid]
    if unknown:
        raise UserError(f"unknown {what} {', '.join(unknown)}: choose from {', '.join(valid)}")
    return chosen or list(valid)


def prep_arguments(splits: list[Split]) -> str:
    """The shortest ``nlbfab-prep`` arguments that prepare these splits: ``--all``, a
    ``--dataset`` for each dataset all of whose splits are named, ``--split`` for the rest."""
    if len(set(splits)) == len(ALL_SPLITS):
        return "--all"
    whole = [name for name in dict.fromkeys(s.dataset.name for s in splits)
             if all(t in splits for t in ALL_SPLITS if t.dataset.name == name)]
    return " ".join([*(f"--dataset {name}" for name in whole),
                     *(f"--split {s.name}" for s in splits if s.dataset.name not in whole)])


def prepare_missing(splits: list[Split], homes: Homes, no_prep: bool, report: Callable[[str], None]) -> None:
    """Preprocess the splits that are not (or say which ``nlbfab-prep`` to run, with ``no_prep``)."""
    unprepared = [s for s in splits if not is_up_to_date(s, homes)]
    if unprepared and no_prep:
        raise UserError(f"{len(unprepared)} split(s) not preprocessed: run 'bin/nlbfab-prep {prep_arguments(unprepared)}'")
    if unprepared:
        prepare_splits(unprepared, homes, report=report)


def shared_datasets(share: list[str], model: str, search: bool) -> list[str]:
    """``--share-datasets``' names, checked: two or more datasets, a model that shares across
    splits, no ``--search`` (each search's trials are runs of its own)."""
    if not share:
        return []
    names = _names(share, list(DATASETS), "dataset")
    if len(set(names)) < 2:
        raise UserError(f"--share-datasets {','.join(names)}: name two or more datasets to share across")
    if not get_model(model).shares_across_splits:
        raise UserError(f"--share-datasets: model {model} cannot share its dynamics across splits (lfads can)")
    if search:
        raise UserError("--share-datasets with --search: search a split with 'bin/nlbfab-search --with-splits ...'")
    return names


def shared_splits(split: Split, shared: list[str]) -> tuple[Split, ...]:
    """The companions a run of ``split`` trains with under ``--share-datasets shared``: the other
    shared datasets' splits of its bin width and phase (none where its dataset is not shared)."""
    if split.dataset.name not in shared:
        return ()
    return tuple(s for s in ALL_SPLITS if s.dataset.name in shared and s.dataset != split.dataset
                 and s.bin_ms == split.bin_ms and s.phase == split.phase)


def plan_runs(splits: list[Split], tag_dir: Path, resume: bool, shared: list[str] = (),
              val_first: bool = False) -> list[Run]:
    """One run per split, longest first, each with its ``shared_splits``; with ``resume``,
    finished ones skipped and interrupted ones resumed from their last checkpoint. With
    ``val_first`` (``--ensemble-top``: a test run takes the members its val run chose, if that
    run has ended), each test run comes after its dataset and bin width's val run where both are
    planned."""
    runs = [Run(s, tag_dir / s.name, with_splits=shared_splits(s, shared)) for s in longest_first(splits)]
    if val_first:
        val_runs = {(r.split.dataset, r.split.bin_ms): r for r in runs if r.split.phase == "val"}
        for run in runs:
            if run.split.phase == "test":
                run.after = val_runs.get((run.split.dataset, run.split.bin_ms))
    for run in runs:
        state = layout.run_state(run.run_dir)
        if resume and state == "finished":
            run.status = "skipped"
        run.resume = resume and state == "interrupted"
    return runs


def _placement_slots(placement: Placement) -> list[Slot]:
    import torch
    cpus = available_cpus()
    return local_slots(torch.cuda.device_count(), placement.jobs_per_gpu, placement.workers or cpus, cpus)


def where(runs: list[Run], placement: Placement, tag_dir: Path) -> str:
    """The line said as a sweep starts: where its runs go and where their logs are."""
    logs = f"logs in {layout.train_log(tag_dir / 'SPLIT')}"
    if placement.backend == "ray":
        return f"{len(runs)} splits to Ray ({placement.address or 'a local instance'}); {logs}"
    slots = _placement_slots(placement)
    return f"{len(runs)} splits on {len(slots)} slots ({', '.join(s.name for s in slots)}); {logs}"


def sweep(runs: list[Run], homes: Homes, run_tag: str, train_args: list[str], placement: Placement,
          show: Callable[[list[Run]], None]) -> None:
    """Run every waiting run where ``placement`` says, each an ``nlbfab-train`` process with
    ``train_args``; ``show`` is called as things change."""
    if placement.backend == "local":
        run_local(runs, _placement_slots(placement), run_tag, train_args, show)
        return
    paths = {"DATA_HOME": str(homes.data), "PREP_HOME": str(homes.prep), "RUNS_HOME": str(homes.runs),
             "TRAIN_INPUT_FILE": homes.train_input, "EVAL_INPUT_FILE": homes.eval_input,
             "EVAL_TARGET_FILE": homes.eval_target}
    run_ray(runs, placement.address, placement.gpus_per_run, run_tag, train_args, paths, show)


def outcome(runs: list[Run], splits: list[Split], homes: Homes, tag_dir: Path) -> tuple[list[str], bool]:
    """The lines that end a sweep (failed runs with their logs, the submission files, their
    problems) and whether it succeeded."""
    lines = [f"FAILED {r.split.name} (exit {r.returncode}): see {r.log}" for r in runs if r.status == "failed"]
    problems = check_submissions(tag_dir, [r.split for r in runs if r.status in ("done", "skipped")], homes)
    for phase in sorted({s.phase for s in splits}):
        path = layout.submission_file(tag_dir, phase)
        lines.append(f"submission: {path}" if path.is_file() else f"submission: none of the {phase} phase (no {phase} split finished)")
    lines += [f"submission problem: {problem}" for problem in problems]
    return lines, not problems and not any(r.status == "failed" for r in runs)
