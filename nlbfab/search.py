"""``nlbfab-search``: a hyperparameter search on one val-phase split, on Ray Tune.

Each trial is an ordinary nlbfab training run (``nlbfab.train.train``) whose settings Optuna's
TPE (``OptunaSearch``) draws from the model's space (``nlbfab.search_space``). The run reports
every epoch's val co-bps to Tune, whose ASHA scheduler stops the poorer trials early. Trials run
side by side on a local Ray instance or an existing cluster, each with its own CPUs (its torch
threads set from them) and share of a GPU. Tune keeps its state in the search's folder, so an
interrupted search continues with ``Tuner.restore``: finished trials stay as they are, and an
interrupted trial resumes from its own last checkpoint. At the end: every trial in a table, the
best trial's settings as ``best.json`` and, asked for, the mean rates of the best trials as the
run's submission.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from nlbfab import layout, ray_cluster
from nlbfab.data import load_split
from nlbfab.ensemble import greedy_selection
from nlbfab.errors import UserError
from nlbfab.evaluation import co_bps
from nlbfab.layout import Homes
from nlbfab.models import get_model
from nlbfab.pool import read_rates, submit_mean
from nlbfab.search_space import Distribution, space_from_json, space_to_json, split_settings
from nlbfab.splits import Split, as_test_phase, get_split
from nlbfab.train import NonFiniteLoss, fabric_for, train
from nlbfab.train_config import TrainConfig, with_split_names

METRIC = "best_val_co_bps"  # the best val co-bps so far: ASHA compares trials by it, TPE learns from its last value
GPU_SHARE = 0.3  # of a GPU per trial where there are GPUs, as nlbfab-all's --gpus-per-run


@dataclass(frozen=True)
class SearchPlan:
    """What a search was asked to do, saved beside it so that ``--resume`` continues the same one:
    the split, how many trials, the space, the settings every trial shares (given options and a
    space file's fixed values, training settings and model hyperparameters alike), each trial's
    CPUs and GPU share, how many trials run at once, ASHA's first rung and the run tag.
    ``gpus`` and ``concurrent`` are None until the search sees its Ray cluster."""

    split: str
    trials: int
    space: dict[str, Distribution]
    fixed: dict
    cpus: int = 1
    gpus: float | None = None
    concurrent: int | None = None
    grace_epochs: int | None = None  # None: ``default_grace_epochs`` of the split
    run_tag: str = "search"

    def __post_init__(self):
        if self.grace_epochs is None:
            object.__setattr__(self, "grace_epochs", default_grace_epochs(get_split(self.split)))

    @property
    def model(self):
        return get_model(self.fixed.get("model", "sae"))

    def to_json(self) -> dict:
        return asdict(self) | {"space": space_to_json(self.space)}

    @classmethod
    def from_json(cls, value: dict) -> "SearchPlan":
        return cls(**value | {"space": space_from_json(value["space"])})


def default_grace_epochs(split: Split) -> int:
    """ASHA's first rung where none is given: 25 epochs, and 75 at 5 ms bins, where runs gain less
    per epoch (the default model's best epoch on mc_maze_small: 92 at 20 ms, 170 at 5 ms)
    and a rung at 25 ranks trials by how fast they start rather than where they end
    (``benchmarks/README.md``, Search)."""
    return 75 if split.bin_ms < 20 else 25


def search_folder(homes: Homes, plan: SearchPlan) -> Path:
    return layout.search_dir(homes.tag_dir(plan.run_tag), get_split(plan.split))


def trial_name(trial_id: str) -> str:
    """A trial's run tag and folder name (run tags are folder names: ``[\\w.+-]+``)."""
    return f"trial_{trial_id}"


def trial_folder(trial) -> str:
    """Tune's name and folder for a ``Trial``: the trial's run tag."""
    return trial_name(trial.trial_id)


def trial_config(plan: SearchPlan, sample: dict, trial: str) -> TrainConfig:
    """A trial's settings: the plan's fixed ones, the values drawn for it, its run tag, and the
    accelerator its resources give it."""
    settings, hparams = split_settings(plan.fixed | sample, plan.model)
    where = {"run_tag": trial, "accelerator": "gpu" if plan.gpus else "cpu"}
    return TrainConfig(split=plan.split, **settings | where, hparams=hparams)


def trial_homes(homes: Homes, plan: SearchPlan) -> Homes:
    """The homes a trial trains in: the search's folder as its RUNS_HOME, so that trial ``T``'s
    run is ``{search}/T/{split}`` with its own submission files in ``{search}/T``."""
    return replace(homes, runs=search_folder(homes, plan))


def final_result(summary: dict) -> dict:
    """What a trial reports once its run has ended by its own stopping rule."""
    return {"epochs": summary["epochs"], METRIC: summary["best_monitored"], "stop": summary["stop_reason"],
            "finished": True}


def run_trial(sample: dict, plan: SearchPlan, homes: Homes) -> None:
    """One trial, in a Ray worker: train with the drawn ``sample`` and report each epoch to Tune.
    Torch gets as many threads as the trial has CPUs, so that trials side by side share the cores
    rather than oversubscribe them. A trial that a resumed search restarts continues its run from
    its last checkpoint, or only reports it where it had finished."""
    torch.set_num_threads(plan.cpus)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(plan.cpus)  # the scoring's, too
    trial = trial_name(tune.get_context().get_trial_id())
    config, where = trial_config(plan, sample, trial), trial_homes(homes, plan)
    run_dir = where.run_dir(trial, get_split(plan.split))
    state = layout.run_state(run_dir)
    if state == "finished":
        tune.report(final_result(layout.read_metrics(run_dir)))
        return
    best = layout.read_progress(run_dir).get("best", -math.inf) if state == "interrupted" else -math.inf
    last = {"epochs": 0, METRIC: best}

    def on_epoch(record: dict) -> None:
        last.update({"epochs": record["epoch"] + 1, METRIC: max(last[METRIC], record["monitored"])})
        if last["epochs"] < config.max_epochs:  # the last one is reported as the run ends, its rates written
            tune.report({**last, "val_co_bps": record["monitored"], "val_loss": record["val_loss"],
                         "train_loss": record["train_loss"], "lr": record["lr"]})

    try:
        summary = train(config, where, resume=state == "interrupted", quiet=True, on_epoch=on_epoch)
    except NonFiniteLoss as error:  # a learning rate too high: a poor trial, not a broken search
        if not math.isfinite(last[METRIC]):
            raise
        tune.report({**last, "stop": str(error).split(":")[0]})
        return
    tune.report(final_result(summary))


def progress_line(trials: list, trial, total: int) -> str:
    """One line as ``trial`` ends (Tune's ``Trial`` objects): its outcome and val co-bps, how many
    trials are done and running, and the best so far."""
    others = [t for t in trials if t is not trial]
    done = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in others)
    running = sum(t.status == "RUNNING" for t in others)
    result = trial.last_result or {}
    if trial.status == "ERROR" or METRIC not in result:
        outcome = f"failed: {failure(trial)}"
    else:
        epochs, how = result["epochs"], result.get("stop") or "stopped early by ASHA"
        outcome = f"val co-bps {result[METRIC]:.4f} after {epochs} epoch{'s' * (epochs != 1)} ({how})"
    scored = [t for t in trials if METRIC in (t.last_result or {})]
    best = max(scored, key=lambda t: t.last_result[METRIC], default=None)
    tail = f"best {best.last_result[METRIC]:.4f} ({trial_name(best.trial_id)})" if best else "no score yet"
    return f"[{done}/{total} done, {running} running] {trial_name(trial.trial_id)}: {outcome}; {tail}"


def failure(trial) -> str:
    """A failed trial's error in one line, the last of the traceback that Tune writes beside the
    driver (the search folder gets its copy later), and where all of it is."""
    lines = Path(trial.error_file).read_text().strip().splitlines() if trial.error_file else []
    return f"{lines[-1] if lines else 'no error recorded'} (all of it: {Path(trial.path) / 'error.txt'})"


class Progress(tune.Callback):
    """Tune's console output is silenced; this says one line per trial that ends instead."""

    def __init__(self, total: int, report: Callable[[str], None]):
        self.total, self.report = total, report

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.report(progress_line(trials, trial, self.total))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.report(progress_line(trials, trial, self.total))


def settle_resources(plan: SearchPlan, cluster: dict) -> SearchPlan:
    """The plan with its GPU share (``GPU_SHARE`` where the cluster has GPUs, else 0) and its
    concurrency (the cluster's CPUs over each trial's) settled; a trial the cluster cannot hold
    (Tune would wait for it for ever) fails in one line."""
    gpus = plan.gpus if plan.gpus is not None else GPU_SHARE if cluster.get("GPU", 0) else 0.0
    for option, wanted, kind in (("--cpus-per-trial", plan.cpus, "CPU"), ("--gpus-per-trial", gpus, "GPU")):
        if wanted > cluster.get(kind, 0):
            raise UserError(f"{option} {wanted:g}: the Ray cluster has {cluster.get(kind, 0):g} {kind}s, so no trial "
                            f"could start; ask for at most that many")
    concurrent = plan.concurrent or max(1, int(cluster.get("CPU", 1)) // plan.cpus)
    return replace(plan, gpus=gpus, concurrent=concurrent)


def tuner(plan: SearchPlan, homes: Homes, report: Callable[[str], None], resume: bool) -> tune.Tuner:
    """A new Tune experiment for ``plan`` in the search's folder, or the interrupted one restored
    (finished trials kept, unfinished and failed ones run again, from their own checkpoints)."""
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan, homes=homes),
                                    {"cpu": plan.cpus, "gpu": plan.gpus})
    path = layout.tune_dir(search_folder(homes, plan))
    if resume:
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, restart_errored=True)
    base = trial_config(plan, {}, "base")
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # rungs at grace, 3 x grace, ... below --max-epochs; stop_last_trials=False: a trial at
    # --max-epochs ends by itself, as it must to write its rates (none: every trial trains to its end)
    asha = ASHAScheduler(time_attr="epochs", max_t=base.max_epochs, grace_period=plan.grace_epochs,
                         reduction_factor=3, stop_last_trials=False) if plan.grace_epochs < base.max_epochs else None
    # reuse_actors: a trial starts in a worker that has torch and nlbfab imported already
    return tune.Tuner(
        trainable, param_space={name: d.to_tune() for name, d in plan.space.items()},
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=OptunaSearch(seed=base.seed),
                                    scheduler=asha, num_samples=plan.trials, max_concurrent_trials=plan.concurrent,
                                    reuse_actors=True, trial_name_creator=trial_folder,
                                    trial_dirname_creator=trial_folder),
        run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent), verbose=0,
                                  callbacks=[Progress(plan.trials, report)]))


@contextlib.contextmanager
def ray_session(address: str | None):
    """Ray for the search and the runs after it: the cluster at ``address``, or a new local
    instance; one already running in this process (a test's) is used as it is."""
    started = not ray.is_initialized()
    if started:
        ray_cluster.init(address or "local", include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def search(plan: SearchPlan, homes: Homes, resume: bool,
           report: Callable[[str], None]) -> tuple[SearchPlan, list[dict]]:
    """Run the search on Ray (in a ``ray_session``), or with ``resume`` continue it (``plan``:
    ``read_plan``'s). A new search replaces an old one of the same tag and split. Returns the plan
    as settled and ``trial_rows``."""
    folder = search_folder(homes, plan)
    if not resume:
        plan = settle_resources(plan, ray.cluster_resources())
        base = trial_config(plan, {}, "base")
        if base.accelerator == "cpu":  # a GPU trial's settings can only be tried where its GPU is
            fabric_for(base)
        if folder.exists():  # replaced once the new search can run
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        layout.write_json(layout.search_plan(folder), plan.to_json())
    report(f"{plan.split}: {plan.trials} trials of {plan.model.name}, {plan.concurrent} at a time, each "
           f"{plan.cpus} CPU(s)" + (f" and {plan.gpus:g} GPU" if plan.gpus else "") + f"; runs in {folder}")
    # Tune's banner and its tracebacks of failed trials; Progress says what matters, in a line each
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()):
        tuner(plan, homes, report, resume).fit()
    rows = trial_rows(plan, homes)
    layout.write_json(layout.search_trials(folder), {"trials": rows})
    return plan, rows


def read_plan(folder: Path) -> SearchPlan:
    path = layout.search_plan(folder)
    if not tune.Tuner.can_restore(str(layout.tune_dir(folder))) or not path.is_file():
        raise UserError(f"nothing to resume in {folder}: drop --resume to start the search")
    return SearchPlan.from_json(json.loads(path.read_text()))


def trial_rows(plan: SearchPlan, homes: Homes) -> list[dict]:
    """Every trial of the search, best val co-bps first: its name, status (finished: trained
    until its own stopping rule; stopped: by ASHA; failed; unfinished: the search was
    interrupted), epochs, best val co-bps, why it stopped, and the values drawn for it."""
    analysis = tune.ExperimentAnalysis(str(layout.tune_dir(search_folder(homes, plan))))
    rows = []
    for trial in analysis.trials:
        result = trial.last_result or {}
        status = {"TERMINATED": "finished" if result.get("finished") else "stopped", "ERROR": "failed"}
        rows.append({"trial": trial_name(trial.trial_id), "status": status.get(trial.status, "unfinished"),
                     "epochs": result.get("epochs", 0), "val_co_bps": result.get(METRIC),
                     "stop": result.get("stop") or ("ASHA" if status.get(trial.status) == "stopped" else None),
                     "params": {name: trial.config[name] for name in plan.space if name in trial.config}})
    return sorted(rows, key=lambda r: -math.inf if r["val_co_bps"] is None else r["val_co_bps"], reverse=True)


def trials_table(rows: list[dict], space: dict) -> str:
    """``trial_rows`` as text, one line a trial, its drawn values last."""
    names = list(space)
    lines = [f"{'trial':22s} {'status':10s} {'epochs':>6s} {'co-bps':>8s}" + "".join(f" {n:>13s}" for n in names)]
    for r in rows:
        score = f"{r['val_co_bps']:8.4f}" if r["val_co_bps"] is not None else f"{'-':>8s}"
        values = "".join(f" {r['params'][n]:>13d}" if type(r["params"].get(n)) is int  # a seed, all its digits
                         else f" {r['params'][n]:>13.4g}" if isinstance(r["params"].get(n), float)
                         else f" {str(r['params'].get(n, '-')):>13s}" for n in names)
        lines.append(f"{r['trial']:22s} {r['status']:10s} {r['epochs']:>6} {score}{values}")
    return "\n".join(lines)


def trial_run_dir(homes: Homes, plan: SearchPlan, trial: str) -> Path:
    return trial_homes(homes, plan).run_dir(trial, get_split(plan.split))


def write_best(plan: SearchPlan, homes: Homes, rows: list[dict]) -> Path:
    """The best trial's settings (its ``config.json``: every ``TrainConfig`` field, the model's
    hyperparameters under ``hparams``) as ``best.json``, without its run tag and accelerator, for
    ``nlbfab-train --config``."""
    scored = [r for r in rows if r["val_co_bps"] is not None]
    if not scored:
        raise UserError(f"no trial of the search on {plan.split} has a val co-bps: see the trials' errors above")
    settings = json.loads(layout.config_file(trial_run_dir(homes, plan, scored[0]["trial"])).read_text())
    path = layout.best_config(search_folder(homes, plan))
    layout.write_json(path, {k: v for k, v in settings.items() if k not in ("run_tag", "accelerator")})
    return path


def top_trials(plan: SearchPlan, homes: Homes, rows: list[dict], count: int,
               report: Callable[[str], None]) -> list[str]:
    """At most ``count`` finished trials whose mean rates give the best val co-bps, chosen greedily
    (``nlbfab.ensemble.greedy_selection``: the best trial, then each time the one whose addition
    to the mean scores best, while it raises the mean's); stopped and failed trials have no rates."""
    split = get_split(plan.split)
    finished = [r["trial"] for r in rows if r["status"] == "finished"]
    if not finished:
        raise UserError("--submit-top: no trial trained to its end (stopped or failed trials have no rates)")
    if count > len(finished):
        report(f"--submit-top {count}: only {len(finished)} trial(s) finished; submitting their mean")
    rates = [read_rates(layout.rates_file(trial_run_dir(homes, plan, t)), split)["eval_rates_heldout"]
             for t in finished]
    data = load_split(split, homes)
    return [finished[k] for k in greedy_selection(rates, lambda mean: co_bps(data, mean), min(count, len(finished)))]


def config_on_test_split(plan: SearchPlan, homes: Homes, trial: str, test_split: Split) -> TrainConfig:
    """A chosen trial's settings (its ``config.json``) for the test-phase split, under the trial's
    run tag: the run goes beside the trial's val run, ``{search}/{trial}/{test split}``; its
    ``--with-splits`` splits, if any, also on the test phase (their train and val trials)."""
    settings = json.loads(layout.config_file(trial_run_dir(homes, plan, trial)).read_text())
    companions = [as_test_phase(get_split(name)).name for name in with_split_names(settings.get("with_splits", ""))]
    settings |= {"split": test_split.name, "accelerator": "gpu" if plan.gpus else "cpu",
                 "with_splits": ",".join(companions)}
    return TrainConfig(**settings)


def train_run(config: TrainConfig, homes: Homes, cpus: int) -> str:
    """A Ray task: one ordinary training run with ``cpus`` threads (resumed where it was
    interrupted, skipped where it finished); returns its folder."""
    torch.set_num_threads(cpus)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(cpus)
    run_dir = homes.run_dir(config.run_tag, get_split(config.split))
    state = layout.run_state(run_dir)
    if state != "finished":
        train(config, homes, resume=state == "interrupted", quiet=True)
    return str(run_dir)


def train_test_phase(plan: SearchPlan, homes: Homes, trials: list[str], report: Callable[[str], None]) -> list[Path]:
    """Train each of ``trials``' settings on the test-phase split, side by side on Ray with the
    trials' resources (in a ``ray_session``). Returns the runs' folders."""
    test_split = as_test_phase(get_split(plan.split))
    where = trial_homes(homes, plan)
    task = ray.remote(train_run).options(num_cpus=plan.cpus, num_gpus=plan.gpus)
    report(f"{test_split.name}: training the settings of {', '.join(trials)}")
    pending = [task.remote(config_on_test_split(plan, homes, t, test_split), where, plan.cpus) for t in trials]
    try:
        return [Path(run_dir) for run_dir in ray.get(pending)]
    except ray.exceptions.RayTaskError as error:  # the run's own error, in one line
        cause = str(error.cause).strip().splitlines()
        raise UserError(f"training on {test_split.name} failed: {cause[-1] if cause else type(error.cause).__name__}"
                        f"; the val submission is written, --resume --submit-top retries") from None


def submit_top(plan: SearchPlan, homes: Homes, rows: list[dict], count: int, test: bool,
               report: Callable[[str], None]) -> dict:
    """The search's submission (in a ``ray_session``): the mean rates of the ``top_trials`` on the
    val phase, scored, and with ``test`` the mean of their settings trained on the test phase.
    Returns the chosen trials and ``submit_mean``'s result for each phase, by phase."""
    split = get_split(plan.split)
    chosen = top_trials(plan, homes, rows, count, report)
    submitted = {"trials": chosen, "val": submit_mean(split, [trial_run_dir(homes, plan, t) for t in chosen], homes,
                                                      plan.run_tag, report)}
    if test:
        submitted["test"] = submit_mean(as_test_phase(split), train_test_phase(plan, homes, chosen, report), homes,
                                        plan.run_tag, report)
    return submitted
