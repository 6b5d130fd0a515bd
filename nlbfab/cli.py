"""The command-line layer: parse options, call one library function, print what happened.

Every command turns a ``UserError`` into one line on stderr and exit status 2, so bad input
never ends in a traceback.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import click

from nlbfab import config, layout
from nlbfab.command import (Command, TrainCommand, check_pass_through, chosen_datasets, friendly_errors,
                            given_train_options, train_config, train_options)
from nlbfab.errors import UserError
from nlbfab.splits import SPLIT_NAMES, as_test_phase, get_split, splits_of
from nlbfab.train_config import option_name, with_split_names


def _report(line: str) -> None:
    click.echo(line, err=True)


@click.command(cls=Command)
@click.option("--dataset", "names", multiple=True, help="Dataset to make (repeatable), e.g. mc_maze.")
@click.option("--all", "all_", is_flag=True, help="Make all 7 datasets.")
@click.option("--scale", type=click.Choice(["tiny", "small", "full"]), default="small", show_default=True,
              help="full: the real unit and trial counts; small: the real units, an eighth of the trials; "
                   "tiny: a few units and trials (tests).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2 ** 32 - 1),
              help="Random seed; the same seed gives the same files.")
@click.option("--variability", type=click.Choice(["low", "realistic"]), default="low", show_default=True,
              help="low: trials of a condition differ only by timing and Poisson noise; realistic: plus "
                   "slow latent noise and input pulses at random times along a few input directions, at half the "
                   "firing rates, which saturate at 200 spikes/s.")
@click.option("--force", is_flag=True,
              help="Rewrite datasets that already exist with this scale, seed and variability.")
@friendly_errors
def synth(names, all_, scale, seed, variability, force):
    """Write synthetic NLB datasets (NWB files in DANDI's layout, with ground truth) to DATA_HOME."""
    from nlbfab.synth_nwb import existing_synthesis, synthesize
    datasets = chosen_datasets(names, all_)
    data_home = config.writable_home("DATA_HOME")
    for dataset in datasets:
        if not force and existing_synthesis(data_home, dataset) == (scale, seed, variability):
            _report(f"{dataset.name}: already synthesized ({scale}, seed {seed}, {variability} variability) in "
                    f"{layout.dataset_dir(data_home, dataset)}; --force to redo")
            continue
        started = time.perf_counter()
        _report(f"{dataset.name}: synthesizing ({scale}, seed {seed}, {variability} variability) ...")
        folder = synthesize(dataset, data_home, scale, seed, variability)
        _report(f"{dataset.name}: wrote {folder} in {time.perf_counter() - started:.1f} s")


@click.command(cls=Command)
@click.option("--split", "split_names", multiple=True, help="Split to preprocess (repeatable), e.g. mc_maze-20ms-val.")
@click.option("--dataset", "names", multiple=True, help="Preprocess all 4 splits of this dataset (repeatable).")
@click.option("--all", "all_", is_flag=True, help="Preprocess all 28 splits.")
@click.option("--force", is_flag=True, help="Redo splits that are already up to date.")
@click.option("--engine", type=click.Choice(["native", "nlb_tools"]), default="native", show_default=True,
              help="native: cut the tensors straight from the NWB files (under 2 GB); nlb_tools: through "
                   "nlb_tools' NWBDataset and make_tensors, as nlb-lightning did (about 10 GB for mc_maze). "
                   "Both give the same tensors.")
@friendly_errors
def prep(split_names, names, all_, force, engine):
    """Preprocess NWB datasets from DATA_HOME into per-split HDF5 tensors under PREP_HOME."""
    from nlbfab.prep import missing_data_hint, prepare_splits
    if not (split_names or names or all_):
        raise UserError("name a --split (e.g. mc_maze-20ms-val), a --dataset, or use --all")
    if all_ and split_names:
        raise UserError("--all or --split, not both")
    wanted = [get_split(n) for n in split_names]
    if names or all_:
        wanted += [s for dataset in chosen_datasets(names, all_) for s in splits_of(dataset)]
    fix = missing_data_hint(list(dict.fromkeys(s.dataset for s in wanted)))
    prepare_splits(wanted, config.homes(writable=("PREP_HOME",), existing={"DATA_HOME": fix}), force, _report, engine)


@click.command(cls=Command)
@click.option("--dataset", "names", multiple=True, help="Dataset to download (repeatable), e.g. mc_maze.")
@click.option("--all", "all_", is_flag=True, help="Download all 7 datasets (about 2 GB).")
@friendly_errors
def download(names, all_):
    """Download NLB datasets from DANDI into DATA_HOME (needs the optional 'dandi' extra)."""
    from nlbfab.download import check_ready, dandi_url
    from nlbfab.download import download as fetch
    datasets = chosen_datasets(names, all_)
    check_ready(datasets[0])  # before DATA_HOME is made or a line printed
    data_home = config.writable_home("DATA_HOME")
    for dataset in datasets:
        _report(f"{dataset.name}: downloading {dandi_url(dataset)} ...")
        _report(f"{dataset.name}: files in {fetch(dataset, data_home)}")


@click.command(cls=Command)
@click.option("--split", "split_names", multiple=True, required=True,
              help="Split to predict (repeatable), e.g. mc_maze-20ms-val.")
@click.option("--method", type=click.Choice(["smoothing", "oracle"]), default="smoothing", show_default=True,
              help="smoothing: Gaussian-smoothed spikes + Poisson regression; oracle: a synthetic dataset's true rates.")
@click.option("--run-tag", default=None, help="Writes into RUNS_HOME/RUN_TAG's submission files (default: the method).")
@friendly_errors
def baseline(split_names, method, run_tag):
    """Write a baseline's rates through the submission path, and score the val splits."""
    from nlbfab.baselines import run_baseline
    splits = [get_split(n) for n in split_names]
    homes = config.homes(writable=("RUNS_HOME",), existing={"PREP_HOME": f"run 'bin/nlbfab-prep --split {splits[0].name}'"})
    run_baseline(method, splits, homes, run_tag or method, click.echo)


@click.command(cls=TrainCommand, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--split", "split_name", required=True, help="Split to train on, e.g. mc_maze-20ms-val.")
@train_options
@click.option("--resume", is_flag=True, help="Continue from the run's last checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
@click.pass_context
@friendly_errors
def train(ctx, split_name, resume, quiet, **options):
    """Train a model on one split with Lightning Fabric, and write its rates to the submission."""
    from nlbfab.train import train as run
    split = get_split(split_name)
    if resume:
        options = resumed_options(ctx, options, layout.config_file(config.homes().run_dir(options["run_tag"], split)))
    elif ctx.default_map and ctx.default_map.get("model", options["model"]) != options["model"]:
        options = options_of_another_model(ctx, options)  # a file without "model" is no other model's
    settings = train_config(split_name, options, ctx.args)
    homes = config.homes(writable=("RUNS_HOME",), existing={"PREP_HOME": f"run 'bin/nlbfab-prep --split {split_name}'"})
    summary = run(settings, homes, resume=resume, quiet=quiet)
    if "submission" in summary:
        click.echo(f"{summary['split']}: {summary['epochs']} epochs ({summary['stop_reason']}), best at "
                   f"{summary['best_epoch']}, {summary['seconds']:.0f} s; rates in {summary['submission']}")
        if "metrics" in summary and split.phase == "test":
            click.echo("  scored against the test file EvalAI would hold (a synthetic dataset's copy):")
        for name, value in summary.get("metrics", {}).items():
            click.echo(f"  {name:10s} {value:.4f}")
        if "ensemble" in summary:
            click.echo(member_table(summary))
        click.echo(f"run folder: {summary['run_dir']}\nTensorBoard: tensorboard --logdir {summary['run_dir']}")


def resumed_options(ctx: click.Context, options: dict, saved_config: Path) -> dict:
    """``--resume``: the settings the run started with (its ``config.json``) for every option not
    given again, so that a resume needs only the split and run tag; given ones still win (a model
    or size the checkpoint cannot take then fails in one line)."""
    from click.core import ParameterSource
    if not saved_config.is_file():  # nothing to resume: the run says so
        return options
    saved = json.loads(saved_config.read_text())
    given = {name for name in options if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE}
    resumed = {name: saved[name] if name in saved and name not in given else value for name, value in options.items()}
    if "config" not in given and resumed["model"] == saved.get("model"):
        resumed["config"] = saved.get("hparams") or {}  # the hyperparameters given again override these
    return resumed


def options_of_another_model(ctx: click.Context, options: dict) -> dict:
    """``--config`` of one model's run with another ``--model`` given: the file's model
    hyperparameters are that model's, and its ``--average-decay`` and ``--train-eval-heldin`` that
    model's defaults as the run settled them; the new model takes its own (where not given)."""
    from click.core import ParameterSource
    settled = {name: None for name in ("average_decay", "train_eval_heldin")
               if ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE}
    return options | settled | {"config": {}}


def member_table(summary: dict) -> str:
    """An ensemble run's members (* for those in the submission) and their mean: seed, best epoch,
    and the NLB metrics (val phase) or the val loss it was stopped on (test phase: the eval
    trials' held-in loss, the negative of its monitored value)."""
    members = summary["ensemble"]["members"]
    values = [m.get("metrics") or {"val loss": -m["best_monitored"]} for m in members]
    names = list(values[0])
    mean = summary["metrics"] if "metrics" in members[0] else {"val loss": -summary["best_monitored"]}
    lines = [f"{'member':>9s} {'seed':>6s} {'best at':>8s}" + "".join(f"{n:>10s}" for n in names) + "  stopped"]
    for m, v in zip(members, values):
        lines.append(f"{m['member']:>8d}{'*' if m['chosen'] else ' '} {m['seed']:>6d} {m['best_epoch']:>8d}"
                     + "".join(f"{v[n]:>10.4f}" for n in names) + f"  {m['stop_reason']}")
    lines.append(f"{'mean of *':>9s} {'':>6s} {'':>8s}" + "".join(f"{mean[n]:>10.4f}" for n in names))
    return "\n".join(lines)


@click.command(cls=Command)
@click.option("--split", "split_name", required=True,
              help="A split, e.g. mc_maze-20ms-val; a test split only of a synthetic dataset.")
@click.option("--run-tag", "run_tags", multiple=True, required=True,
              help="Run whose submission of the split's phase to score (repeatable); a tag named 'oracle' gives "
                   "the reference.")
@friendly_errors
def scores(split_name, run_tags):
    """Score runs' submissions on one split with nlb_tools (as EvalAI does) and print a table. A
    synthetic dataset's test split is scored against the test file EvalAI would hold."""
    from nlbfab.scoring import score_table
    split, homes = get_split(split_name), config.homes()
    click.echo(score_table(split, run_tags, homes, _report))


@click.command(cls=Command)
@click.option("--run-tag", required=True, help="The run whose val and test submission files to rebuild.")
@friendly_errors
def submit(run_tag):
    """Rebuild a run's submission files from the rates each of its splits wrote into its folder;
    a damaged submission file is moved aside, not deleted."""
    from nlbfab.submission import rebuild
    tag_dir = config.homes().tag_dir(run_tag)
    if not tag_dir.is_dir():
        raise UserError(f"no run '{run_tag}' in RUNS_HOME ({tag_dir}): check the tag, or RUNS_HOME")
    for path, groups in rebuild(tag_dir, _report).items():
        click.echo(f"{path}: {len(groups)} group(s): {', '.join(groups)}")


@click.command(cls=Command)
@click.option("--split", "split_name", required=True, help="The split whose runs to pool, e.g. mc_maze_small-20ms-val.")
@click.option("--run-tag", "run_tags", multiple=True,
              help="A finished run of the split (repeatable; two or more on the val phase). On the test phase, "
                   "default: the runs the val pool of --pool-tag chose.")
@click.option("--pool-tag", required=True, help="The pool's own run tag: its rates go into RUNS_HOME/POOL_TAG's "
                                                 "submission file.")
@click.option("--top", type=click.IntRange(min=1),
              help="Val phase: the most runs in the mean, chosen greedily by val co-bps while each raises the "
                   "mean's (default: no limit).")
@friendly_errors
def pool(split_name, run_tags, pool_tag, top):
    """Submit the mean rates of several finished runs of one split (other models, settings or
    seeds): on the val phase of those that raise the mean's val co-bps, on the test phase of the
    runs the val pool chose."""
    from nlbfab.pool import pool_runs
    split = get_split(split_name)
    homes = config.homes(writable=("RUNS_HOME",), existing={"PREP_HOME": f"run 'bin/nlbfab-prep --split {split.name}'"})
    for tag in (*run_tags, pool_tag):
        layout.check_run_tag(tag)
    summary = pool_runs(split, list(run_tags), pool_tag, top, homes, _report)
    chosen = summary["pool"]["chosen"]
    for tag, value in summary["pool"].get("co-bps", {}).items():
        click.echo(f"{'*' if tag in chosen else ' '} {tag:24s} co-bps {value:.4f}")
    click.echo(f"{split.name}: the mean of {len(chosen)} run(s) ({', '.join(chosen)}) in {summary['submission']}")
    if "metrics" in summary and split.phase == "test":
        click.echo("  scored against the test file EvalAI would hold (a synthetic dataset's copy):")
    for name, value in summary.get("metrics", {}).items():
        click.echo(f"  {name:10s} {value:.4f}")


@click.command(cls=Command, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--datasets", multiple=True, help="Datasets to train (comma-separated or repeated; default all 7).")
@click.option("--bins", multiple=True, help="Bin widths in ms: 5, 20 (default both).")
@click.option("--phases", multiple=True, help="val, test (default both).")
@click.option("--run-tag", default="all", show_default=True, help="All splits share RUNS_HOME/RUN_TAG's submission files.")
@click.option("--jobs-per-gpu", default=3, show_default=True, type=click.IntRange(min=1), help="Concurrent runs per visible GPU.")
@click.option("--workers", type=click.IntRange(min=1), help="Concurrent CPU runs without GPUs (default: one per core).")
@click.option("--resume", is_flag=True, help="Skip finished splits and resume interrupted ones.")
@click.option("--no-prep", is_flag=True, help="Do not preprocess missing splits; say which nlbfab-prep to run.")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine's GPUs or cores; ray: an existing Ray cluster (pip install -e .[ray]).")
@click.option("--address", default=None, help="Ray cluster address (e.g. auto or ray://head:10001); none: a local Ray.")
@click.option("--gpus-per-run", type=click.FloatRange(0, 1, min_open=True),
              help="Ray: GPU share per run (default 0.3 with GPUs, else 0).")
@click.option("--search", "search_trials", type=click.IntRange(min=1),
              help="Instead of one run per split, an nlbfab-search of this many trials on each dataset and bin "
                   "width's val split; the mean of at most --search-top of its trials, chosen greedily, is submitted, "
                   "and their settings are trained on the test split.")
@click.option("--search-top", default=5, show_default=True, type=click.IntRange(min=1),
              help="With --search: the most trials whose mean rates are submitted (chosen greedily on val co-bps).")
@click.option("--share-datasets", "share", multiple=True,
              help="Train each split of these datasets (comma-separated, two or more) with the others' splits of its "
                   "bin width and phase, as nlbfab-train's --with-splits does (a model that shares across splits: "
                   "lfads), e.g. mc_maze,mc_maze_large,mc_maze_medium,mc_maze_small.")
@click.pass_context
@friendly_errors
def sweep(ctx, datasets, bins, phases, run_tag, resume, no_prep, search_trials, search_top, share, **placement):
    """Train all 28 splits (or a subset) over every GPU, or the CPU cores. Other options
    (e.g. --max-epochs 50 --hidden-size 64) pass through to every nlbfab-train run."""
    from nlbfab import sweep as sw
    from nlbfab.models import get_model
    run_settings = check_pass_through(train, ctx.args)
    where, splits = sw.Placement(**placement), sw.select_splits(datasets, bins, phases)
    if where.backend == "local":  # Fabric's settings tried here, where the runs will be (a cluster's, there)
        from nlbfab.train import available_accelerators, fabric_for
        fabric_for(replace(run_settings, accelerator="gpu" if "gpu" in available_accelerators() else "cpu"))
    if not search_trials and ctx.get_parameter_source("search_top") is click.core.ParameterSource.COMMANDLINE:
        raise UserError("--search-top goes with --search N: the most trials of each search whose mean is submitted")
    if search_trials and resume:
        raise UserError("--resume with --search: continue each interrupted search with 'bin/nlbfab-search --split "
                        f"SPLIT --run-tag {run_tag} --resume'")
    shared = sw.shared_datasets(share, run_settings.model, bool(search_trials))
    if search_trials:
        return search_each(splits, search_trials, search_top, run_tag, placement["address"], no_prep, ctx.args)
    homes = config.homes(writable=("PREP_HOME", "RUNS_HOME"))
    # a test run takes the members its val run chose (--ensemble-top): it starts once that run has ended
    val_first = any(a.startswith("--ensemble-top") for a in ctx.args)
    runs = sw.plan_runs(splits, homes.tag_dir(run_tag), resume, shared, val_first)
    alone = next((r.split.name for r in runs if not r.with_splits), None)
    unused = get_model(run_settings.model).only_with_splits(run_settings.hparams)
    if alone and unused:
        raise UserError(f"{option_name(unused[0])} acts only with --with-splits, and {alone} would train alone: "
                        f"share its dataset with --share-datasets, or drop the option")
    needed = [*splits, *(c for r in runs for c in r.with_splits)]
    if run_settings.train_test_heldin:  # a val run reads its dataset's test trials from the test split
        needed += [as_test_phase(s) for s in needed if s.phase == "val"]
    sw.prepare_missing(list(dict.fromkeys(needed)), homes, no_prep, _report)
    _report(sw.where(runs, where, homes.tag_dir(run_tag)))
    started = time.perf_counter()
    sw.sweep(runs, homes, run_tag, list(ctx.args), where, sw.live_table(len(runs) + 1, sys.stderr))
    click.echo(f"\nsweep finished in {time.perf_counter() - started:.0f} s\n" + sw.summary_table(runs))
    lines, succeeded = sw.outcome(runs, splits, homes, homes.tag_dir(run_tag))
    click.echo("\n".join(lines))
    if not succeeded:
        sys.exit(1)


@click.command(cls=Command, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--split", "split_name", required=True, help="A val-phase split to search on, e.g. mc_maze-20ms-val.")
@click.option("--trials", default=20, show_default=True, type=click.IntRange(min=1),
              help="Trials (training runs) to draw.")
@click.option("--space", type=click.Path(dir_okay=False),
              help="JSON (or .yaml) file that changes the model's search space (README: Hyperparameter search).")
@click.option("--run-tag", default="search", show_default=True,
              help="The search goes to RUNS_HOME/RUN_TAG/search/SPLIT, --submit-top into RUNS_HOME/RUN_TAG.")
@click.option("--cpus-per-trial", "cpus", default=1, show_default=True, type=click.IntRange(min=1),
              help="CPUs of each trial (its torch threads).")
@click.option("--gpus-per-trial", "gpus", type=click.FloatRange(0, 1),
              help="GPU share of each trial (default 0.3 where the Ray cluster has GPUs, else 0).")
@click.option("--concurrent", type=click.IntRange(min=1),
              help="Trials at a time (default: the Ray cluster's CPUs // --cpus-per-trial).")
@click.option("--grace-epochs", type=click.IntRange(min=1),
              help="ASHA's first rung: epochs every trial trains before it can be stopped early [default: 25; "
                   "75 at 5 ms].")
@click.option("--address", default=None, help="Ray cluster address (e.g. auto or ray://head:10001); none: a local Ray.")
@click.option("--resume", is_flag=True, help="Continue this tag's interrupted search on the split, as it was started.")
@click.option("--submit-top", type=click.IntRange(min=1),
              help="Submit the mean rates of at most this many best trials (chosen greedily on val co-bps, while "
                   "each raises the mean's) as the run's submission-val.h5, and of their settings trained on the "
                   "test-phase split as submission-test.h5.")
@click.option("--no-test", is_flag=True, help="With --submit-top: the val phase only.")
@click.pass_context
@friendly_errors
def search(ctx, split_name, trials, space, run_tag, address, resume, submit_top, no_test, **plan_options):
    """Search a model's hyperparameters on one val split with Ray Tune: Optuna's TPE draws each
    trial's settings, ASHA stops poor trials early. Other options (e.g. --max-epochs 50 --model
    gru_readout) pass through to every trial."""
    sr = search_module()
    split = get_split(split_name)
    if split.phase != "val":
        raise UserError(f"{split.name}: a search chooses by val co-bps, which only val-phase splits have; "
                        f"search on {split.name.replace('-test', '-val')}")
    homes = config.homes(writable=("RUNS_HOME",), existing={"PREP_HOME": f"run 'bin/nlbfab-prep --split {split.name}'"})
    if no_test and not submit_top:
        raise UserError("--no-test goes with --submit-top: it keeps the submitted trials' settings off the test split")
    phases = [split] + ([as_test_phase(split)] if submit_top and not no_test else [])
    for needed in phases:
        if not homes.split_file(needed, "eval_input").is_file():
            raise UserError(f"{needed.name} is not preprocessed: run 'bin/nlbfab-prep --split {needed.name}'")
    folder = layout.search_dir(homes.tag_dir(run_tag), split)
    if resume:
        given = [p.opts[0] for p in ctx.command.params if p.name in ("trials", "space", "cpus", "gpus", "concurrent",
                 "grace_epochs") and ctx.get_parameter_source(p.name) is click.core.ParameterSource.COMMANDLINE]
        if given or ctx.args:
            raise UserError(f"--resume continues the search with the settings it started with "
                            f"({layout.search_plan(folder)}): drop {' '.join(given + ctx.args)}")
        plan = sr.read_plan(folder)
    else:
        plan = sr.SearchPlan(split.name, trials, *search_space(split.name, space, ctx.args), run_tag=run_tag,
                             **plan_options)
    companions = [get_split(name) for name in with_split_names(plan.fixed.get("with_splits", ""))]
    for needed in companions + ([as_test_phase(c) for c in companions] if len(phases) > 1 else []):
        if not homes.split_file(needed, "eval_input").is_file():
            raise UserError(f"--with-splits: {needed.name} is not preprocessed: run 'bin/nlbfab-prep --split "
                            f"{needed.name}'")
    for needed in [as_test_phase(s) for s in [split, *companions]] if plan.fixed.get("train_test_heldin") else []:
        if not homes.split_file(needed, "eval_input").is_file():
            raise UserError(f"--train-test-heldin reads {needed.name}, which is not preprocessed: run 'bin/nlbfab-prep "
                            f"--split {needed.name}'")
    with sr.ray_session(address):
        plan, rows = sr.search(plan, homes, resume, _report)
        click.echo(sr.trials_table(rows, plan.space))
        done = sum(r["status"] != "unfinished" for r in rows)
        if done < plan.trials:
            _report(f"interrupted: {done} of {plan.trials} trials done; continue with 'bin/nlbfab-search --split "
                    f"{split.name} --run-tag {run_tag} --resume'")
            sys.exit(130)
        best = sr.write_best(plan, homes, rows)
        click.echo(f"best: {rows[0]['trial']}, val co-bps {rows[0]['val_co_bps']:.4f}; its settings: {best}\n"
                   f"train it: bin/nlbfab-train --config {best} --run-tag {run_tag}-best")  # not {run_tag}: its submission
        if submit_top:
            submitted = sr.submit_top(plan, homes, rows, submit_top, not no_test, _report)
            click.echo(f"submission: the mean of {', '.join(submitted['trials'])} in {submitted['val']['submission']}")
            for name, value in submitted["val"]["metrics"].items():
                click.echo(f"  {name:10s} {value:.4f}")
            if "test" in submitted:
                click.echo(f"submission: the mean of their settings trained on {phases[1].name} in "
                           f"{submitted['test']['submission']}")
                for name, value in submitted["test"].get("metrics", {}).items():
                    click.echo(f"  {name:10s} {value:.4f}")


def search_module():
    """``nlbfab.search``, which needs the ``[ray]`` extra's Ray Tune and Optuna."""
    try:
        import optuna  # noqa: F401
        import ray.tune  # noqa: F401
    except ImportError:
        raise UserError("nlbfab-search needs Ray Tune and Optuna: run 'pip install -e .[ray]'") from None
    from nlbfab import search
    return search


def search_each(splits: list, trials: int, top: int, run_tag: str, address: str | None, no_prep: bool,
                args: list[str]) -> None:
    """``nlbfab-all --search``: for each dataset and bin width among ``splits``, a search of
    ``trials`` trials on its val split (one after another, each spread over the Ray cluster), the
    mean of the ``top`` best trials as its val submission and, where its test split is among
    ``splits``, their settings trained on it as its test submission."""
    from dataclasses import replace

    from nlbfab import sweep as sw
    sr = search_module()
    pairs = {(s.dataset.name, s.bin_ms): replace(s, phase="val") for s in splits}
    with_test = {(s.dataset.name, s.bin_ms) for s in splits if s.phase == "test"}
    plans = [sr.SearchPlan(val.name, trials, *search_space(val.name, None, args), run_tag=run_tag)
             for val in pairs.values()]  # every space and setting checked before any work
    homes = config.homes(writable=("PREP_HOME", "RUNS_HOME"))
    tests = [as_test_phase(val) for val, plan in zip(pairs.values(), plans) if plan.fixed.get("train_test_heldin")]
    sw.prepare_missing(list(dict.fromkeys([*pairs.values(), *splits, *tests])), homes, no_prep, _report)
    with sr.ray_session(address):
        for key, plan in zip(pairs, plans):
            plan, rows = sr.search(plan, homes, False, _report)
            sr.write_best(plan, homes, rows)
            submitted = sr.submit_top(plan, homes, rows, top, key in with_test, _report)
            scores = "  ".join(f"{k} {v:.4f}" for k, v in submitted["val"]["metrics"].items())
            click.echo(f"{plan.split}: best trial {rows[0]['val_co_bps']:.4f}; the mean of {len(submitted['trials'])}: "
                       f"{scores}" + (f"; test phase in {submitted['test']['submission']}" if "test" in submitted else ""))
            if "metrics" in submitted.get("test", {}):
                click.echo("  test phase: " + "  ".join(f"{k} {v:.4f}" for k, v in submitted["test"]["metrics"].items()))


def search_space(split: str, space_file: str | None, args: list[str]) -> tuple[dict, dict]:
    """The space a search draws from and the settings it fixes: the model's space, changed by the
    space file, less the options given, which are fixed with the file's fixed values; all checked."""
    from nlbfab.models import get_model
    from nlbfab.search_space import check_trials, read_space, settle
    given = given_train_options(train, split, args)
    model = get_model(given.get("model", "sae"))
    space, fixed = settle(model, read_space(space_file) if space_file else {}, set(given))
    if not space:
        raise UserError(f"nothing to search: every parameter of the space of model {model.name} is fixed")
    check_trials(split, fixed | given, space, model)
    return space, fixed | given


@click.command(cls=Command, name="splits")
def list_splits():
    """Print the 28 split names."""
    click.echo("\n".join(SPLIT_NAMES))


COMMANDS = {"synth": synth, "prep": prep, "download": download, "baseline": baseline, "train": train,
            "scores": scores, "submit": submit, "pool": pool, "all": sweep, "search": search, "splits": list_splits}

if __name__ == "__main__":  # bin/nlbfab-<command> runs: python -m nlbfab.cli <command> [options]
    # sys.argv stays whole: Fabric's DDP launcher starts the other ranks with the same command line
    COMMANDS[sys.argv[1]](args=sys.argv[2:], prog_name=f"nlbfab-{sys.argv[1]}")
