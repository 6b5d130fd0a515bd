"""The command-line layer: parse options, call one library function, print what happened.

Every command turns a ``UserError`` into one line on stderr and exit status 2, so bad input
never ends in a traceback.
"""
from __future__ import annotations

import functools
import logging
import sys
import time
import typing
import warnings
from dataclasses import fields

import click

from nlbfab import config
from nlbfab.errors import UserError
from nlbfab.splits import DATASETS, SPLIT_NAMES, get_dataset, get_split, splits_of
from nlbfab.train_config import TrainConfig, option_name


def _quiet_libraries() -> None:
    """nlb_tools, pynwb and hdmf warn about things a user cannot act on; keep errors only."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("nlb_tools", "hdmf", "pynwb"):
        logging.getLogger(name).setLevel(logging.ERROR)


class Command(click.Command):
    """A click command whose own parsing errors (an unknown option, a value of the wrong type)
    end in one ``error:`` line and exit status 2, like every other bad input."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as error:
            click.echo(f"error: {error.format_message()} (see {prog_name or self.name} --help)", err=True)
            sys.exit(2)


def train_options(command):
    """``nlbfab-train``'s options, one per ``TrainConfig`` field: name, type, default, help and
    valid values come from the field, so a setting is declared in one place."""
    hints = typing.get_type_hints(TrainConfig)
    for f in reversed([f for f in fields(TrainConfig) if f.metadata["option"]]):
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        valid = f.metadata["valid"]
        bounds = f" Valid: {valid.describe()}." if valid.low is not None or valid.high is not None else ""
        command = click.option(option_name(f.name), f.name, default=f.default, show_default=f.default is not None,
                               type=click.Choice(valid.choices) if valid.choices else kind,
                               help=f.metadata["help"] + bounds)(command)
    return command


def friendly_errors(command):
    """Print a ``UserError`` as one line and exit 2; Ctrl-C exits 130 without a traceback."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        _quiet_libraries()
        try:
            return command(*args, **kwargs)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: finished files are kept, unfinished ones were never put in place", err=True)
            sys.exit(130)
    return run


def _datasets(names, all_):
    if all_:
        return list(DATASETS.values())
    if not names:
        raise UserError(f"name at least one --dataset ({', '.join(DATASETS)}) or use --all")
    return [get_dataset(n) for n in names]


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
@click.option("--force", is_flag=True, help="Rewrite datasets that already exist with this scale and seed.")
@friendly_errors
def synth(names, all_, scale, seed, force):
    """Write synthetic NLB datasets (NWB files in DANDI's layout, with ground truth) to DATA_HOME."""
    from nlbfab.synth_nwb import existing_synthesis, synthesize
    datasets = _datasets(names, all_)
    data_home = config.writable_home("DATA_HOME")
    for dataset in datasets:
        if not force and existing_synthesis(data_home, dataset) == (scale, seed):
            _report(f"{dataset.name}: already synthesized ({scale}, seed {seed}) in {data_home / dataset.folder}; --force to redo")
            continue
        started = time.perf_counter()
        _report(f"{dataset.name}: synthesizing ({scale}, seed {seed}) ...")
        folder = synthesize(dataset, data_home, scale, seed)
        _report(f"{dataset.name}: wrote {folder} in {time.perf_counter() - started:.1f} s")


@click.command(cls=Command)
@click.option("--split", "split_names", multiple=True, help="Split to preprocess (repeatable), e.g. mc_maze-20ms-val.")
@click.option("--dataset", "names", multiple=True, help="Preprocess all 4 splits of this dataset (repeatable).")
@click.option("--all", "all_", is_flag=True, help="Preprocess all 28 splits.")
@click.option("--force", is_flag=True, help="Redo splits that are already up to date.")
@friendly_errors
def prep(split_names, names, all_, force):
    """Preprocess NWB datasets from DATA_HOME into per-split HDF5 tensors under PREP_HOME."""
    from nlbfab.prep import prepare_splits
    if not (split_names or names or all_):
        raise UserError("name a --split (e.g. mc_maze-20ms-val), a --dataset, or use --all")
    wanted = [get_split(n) for n in split_names]
    if names or all_:
        wanted += [s for dataset in _datasets(names, all_) for s in splits_of(dataset)]
    named = " ".join(f"--dataset {name}" for name in dict.fromkeys(s.dataset.name for s in wanted))
    data_home = config.existing_home("DATA_HOME", f"run 'bin/nlbfab-download {named}' (the NLB data) "
                                                  f"or 'bin/nlbfab-synth {named}' (synthetic)")
    prepare_splits(wanted, data_home, config.writable_home("PREP_HOME"), config.split_file_names(), force, _report)


@click.command(cls=Command)
@click.option("--dataset", "names", multiple=True, help="Dataset to download (repeatable), e.g. mc_maze.")
@click.option("--all", "all_", is_flag=True, help="Download all 7 datasets (about 2 GB).")
@friendly_errors
def download(names, all_):
    """Download NLB datasets from DANDI into DATA_HOME (needs the optional 'dandi' extra)."""
    from nlbfab.download import dandi_url
    from nlbfab.download import download as fetch
    datasets = _datasets(names, all_)
    data_home = config.writable_home("DATA_HOME")
    for dataset in datasets:
        _report(f"{dataset.name}: downloading {dandi_url(dataset)} ...")
        _report(f"{dataset.name}: files in {fetch(dataset, data_home)}")


@click.command(cls=Command)
@click.option("--split", "split_names", multiple=True, required=True,
              help="Split to predict (repeatable), e.g. mc_maze-20ms-val.")
@click.option("--method", type=click.Choice(["smoothing", "oracle"]), default="smoothing", show_default=True,
              help="smoothing: Gaussian-smoothed spikes + Poisson regression; oracle: a synthetic dataset's true rates.")
@click.option("--run-tag", default=None, help="Writes RUNS_HOME/RUN_TAG/submission-{phase}.h5 (default: the method).")
@friendly_errors
def baseline(split_names, method, run_tag):
    """Write a baseline's rates through the submission path, and score the val splits."""
    from nlbfab.baselines import predict_baseline
    from nlbfab.scoring import score
    from nlbfab.submission import submit
    splits = [get_split(n) for n in split_names]
    prep_home = config.existing_home("PREP_HOME", f"run 'bin/nlbfab-prep --split {splits[0].name}'")
    data_home, file_names = config.data_home(), config.split_file_names()
    run_dir = config.writable_home("RUNS_HOME") / (run_tag or method)
    for split in splits:
        if not (prep_home / split.name).is_dir():
            raise UserError(f"{split.name} is not preprocessed: run 'bin/nlbfab-prep --split {split.name}'")
    for split, rates in predict_baseline(method, splits, data_home, prep_home, file_names):
        path = submit(split, rates, run_dir, prep_home / split.name, file_names)
        click.echo(f"{split.name}: {method} rates written to {path} (group {split.group})")
        if split.phase == "val":
            metrics = score(prep_home / split.name / file_names["eval_target"], path, split)
            click.echo("  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


@click.command(cls=Command)
@click.option("--split", "split_name", required=True, help="Split to train on, e.g. mc_maze-20ms-val.")
@train_options
@click.option("--resume", is_flag=True, help="Continue from the run's last checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
@friendly_errors
def train(split_name, resume, quiet, **options):
    """Train a model on one split with Lightning Fabric, and write its rates to the submission."""
    from nlbfab.train import train as run
    get_split(split_name)
    train_config = TrainConfig(split=split_name, **options)
    prep_home = config.existing_home("PREP_HOME", f"run 'bin/nlbfab-prep --split {split_name}'")
    summary = run(train_config, prep_home, config.writable_home("RUNS_HOME"), config.split_file_names(),
                  resume=resume, quiet=quiet)
    if "submission" in summary:
        click.echo(f"{summary['split']}: {summary['epochs']} epochs ({summary['stop_reason']}), best at "
                   f"{summary['best_epoch']}, {summary['seconds']:.0f} s; rates in {summary['submission']}")
        for name, value in summary.get("metrics", {}).items():
            click.echo(f"  {name:10s} {value:.4f}")
        click.echo(f"run folder: {summary['run_dir']}\nTensorBoard: tensorboard --logdir {summary['run_dir']}")


@click.command(cls=Command)
@click.option("--split", "split_name", required=True, help="A val-phase split, e.g. mc_maze-20ms-val.")
@click.option("--run-tag", "run_tags", multiple=True, required=True,
              help="Run whose submission-val.h5 to score (repeatable); a tag named 'oracle' gives the reference.")
@friendly_errors
def scores(split_name, run_tags):
    """Score runs' submissions on one val split with nlb_tools (as EvalAI does) and print a table."""
    from nlbfab.scoring import score_table
    split = get_split(split_name)
    if split.phase != "val":
        raise UserError(f"{split.name} is a test split: only EvalAI can score it (upload RUNS_HOME/TAG/submission-test.h5)")
    click.echo(score_table(split, run_tags, config.runs_home(), config.prep_home() / split.name /
                           config.split_file_names()["eval_target"]))


@click.command(cls=Command)
@click.option("--run-tag", required=True, help="The run whose submission-val.h5 and submission-test.h5 to rebuild.")
@friendly_errors
def submit(run_tag):
    """Rebuild a run's submission files from the rates each split wrote (RUNS_HOME/RUN_TAG/SPLIT/rates.h5);
    a damaged submission file is moved aside, not deleted."""
    from nlbfab.submission import rebuild
    run_dir = config.runs_home() / run_tag
    if not run_dir.is_dir():
        raise UserError(f"no run '{run_tag}' in RUNS_HOME ({run_dir}): check the tag, or RUNS_HOME")
    for path, groups in rebuild(run_dir, _report).items():
        click.echo(f"{path}: {len(groups)} group(s): {', '.join(groups)}")


def _split_list(values, valid, what):
    chosen = [v.strip() for value in values for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in valid]
    if unknown:
        raise UserError(f"unknown {what} {', '.join(unknown)}: choose from {', '.join(map(str, valid))}")
    return chosen or list(valid)


@click.command(cls=Command, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--datasets", multiple=True, help="Datasets to train (comma-separated or repeated; default all 7).")
@click.option("--bins", multiple=True, help="Bin widths in ms: 5, 20 (default both).")
@click.option("--phases", multiple=True, help="val, test (default both).")
@click.option("--run-tag", default="all", show_default=True, help="All splits share RUNS_HOME/RUN_TAG/submission-{phase}.h5.")
@click.option("--jobs-per-gpu", default=3, show_default=True, type=click.IntRange(min=1),
              help="Concurrent runs per visible GPU.")
@click.option("--workers", default=None, type=click.IntRange(min=1),
              help="Concurrent CPU runs without GPUs (default: one per core).")
@click.option("--resume", is_flag=True, help="Skip finished splits and resume interrupted ones.")
@click.option("--no-prep", is_flag=True, help="Do not preprocess missing splits; say which nlbfab-prep to run.")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine's GPUs or cores; ray: an existing Ray cluster (pip install -e .[ray]).")
@click.option("--address", default=None, help="Ray cluster address (e.g. auto or ray://head:10001); none: a local Ray.")
@click.option("--gpus-per-run", type=click.FloatRange(0, 1, min_open=True), default=None, help="Ray: GPU share per run (default 0.3 with GPUs, else 0).")
@click.pass_context
@friendly_errors
def sweep(ctx, datasets, bins, phases, run_tag, jobs_per_gpu, workers, resume, no_prep, backend, address, gpus_per_run):
    """Train all 28 splits (or a subset) over every GPU, or the CPU cores. Other options
    (e.g. --max-epochs 50 --hidden-size 64) pass through to every nlbfab-train run."""
    import os

    import torch

    from nlbfab import sweep as sw
    from nlbfab.prep import is_up_to_date, prepare_splits
    from nlbfab.splits import ALL_SPLITS
    train_args = list(ctx.args)
    # bad options and values fail here, before any split is prepared or trained
    parsed = train.make_context("nlbfab-train", ["--split", "mc_maze-20ms-val", *train_args]).params
    TrainConfig(split="mc_maze-20ms-val", **{k: v for k, v in parsed.items() if k not in ("split_name", "resume", "quiet")})
    if any(a in ("--split", "--run-tag", "--resume") for a in train_args):
        raise UserError("--split, --run-tag and --resume are nlbfab-all's own: use --datasets/--bins/--phases")
    chosen = (_split_list(datasets, list(DATASETS), "dataset"), _split_list(bins, ["5", "20"], "bin width"),
              _split_list(phases, ["val", "test"], "phase"))
    splits = [s for s in ALL_SPLITS if s.dataset.name in chosen[0] and str(s.bin_ms) in chosen[1] and s.phase in chosen[2]]
    data_home, file_names = config.data_home(), config.split_file_names()
    prep_home, runs_home = config.writable_home("PREP_HOME"), config.writable_home("RUNS_HOME")
    unprepared = [s for s in splits if not is_up_to_date(s, data_home, prep_home, file_names)]
    if unprepared and no_prep:
        raise UserError(f"{len(unprepared)} split(s) not preprocessed: run 'bin/nlbfab-prep "
                        + " ".join(f"--split {s.name}" for s in unprepared) + "'")
    if unprepared:
        prepare_splits(unprepared, data_home, prep_home, file_names, report=_report)
    runs_dir = runs_home / run_tag
    runs = [sw.Run(s, runs_dir / s.name) for s in sw.longest_first(splits)]
    for run in runs:
        state = sw.run_state(run.run_dir)
        if resume and state == "finished":
            run.status = "skipped"
        run.resume = resume and state == "interrupted"
    started = time.perf_counter()
    if backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UserError("--backend ray needs Ray: run 'pip install -e .[ray]'") from None
        paths = {"DATA_HOME": str(data_home), "PREP_HOME": str(prep_home), "RUNS_HOME": str(runs_home)}
        paths |= {config_name: file_names[key] for config_name, key in (
            ("TRAIN_INPUT_FILE", "train_input"), ("EVAL_INPUT_FILE", "eval_input"), ("EVAL_TARGET_FILE", "eval_target"))}
        _report(f"{len(runs)} splits to Ray ({address or 'a local instance'}); logs in {runs_dir}/SPLIT/train.log")
        sw.run_ray(runs, address, gpus_per_run, run_tag, train_args, paths, _live_table(len(runs) + 1))
    else:
        slots = sw.local_slots(torch.cuda.device_count(), jobs_per_gpu, workers or os.cpu_count(), os.cpu_count())
        _report(f"{len(runs)} splits on {len(slots)} slots ({', '.join(s.name for s in slots)}); "
                f"logs in {runs_dir}/SPLIT/train.log")
        sw.run_local(runs, slots, run_tag, train_args, _live_table(len(runs) + 1))
    click.echo(f"\nsweep finished in {time.perf_counter() - started:.0f} s\n" + sw.summary_table(runs))
    for run in [r for r in runs if r.status == "failed"]:
        click.echo(f"FAILED {run.split.name} (exit {run.returncode}): see {run.log}")
    problems = sw.check_submissions(runs_dir, [r.split for r in runs if r.status in ("done", "skipped")],
                                    prep_home, file_names)
    for phase in sorted({s.phase for s in splits}):
        click.echo(f"submission: {runs_dir / f'submission-{phase}.h5'}")
    for problem in problems:
        click.echo(f"submission problem: {problem}")
    if problems or any(r.status == "failed" for r in runs):
        sys.exit(1)


def _live_table(height: int):
    """Redraw the progress table in place on a terminal; elsewhere print it when it changes."""
    from nlbfab.sweep import progress_table
    last = {"text": None}

    def show(runs):
        text = progress_table(runs)
        if sys.stderr.isatty():
            if last["text"] is not None:
                sys.stderr.write(f"\x1b[{height}F\x1b[J")
            sys.stderr.write(text + "\n")
        elif [line.split()[2] for line in text.splitlines()] != [line.split()[2] for line in (last["text"] or "").splitlines()]:
            sys.stderr.write(text + "\n\n")
        sys.stderr.flush()
        last["text"] = text
    return show


@click.command(cls=Command, name="splits")
def list_splits():
    """Print the 28 split names."""
    click.echo("\n".join(SPLIT_NAMES))


COMMANDS = {"synth": synth, "prep": prep, "download": download, "baseline": baseline, "train": train, "scores": scores, "submit": submit, "all": sweep,
            "splits": list_splits}

if __name__ == "__main__":  # bin/nlbfab-<command> runs: python -m nlbfab.cli <command> [options]
    # sys.argv stays whole: Fabric's DDP launcher starts the other ranks with the same command line
    COMMANDS[sys.argv[1]](args=sys.argv[2:], prog_name=f"nlbfab-{sys.argv[1]}")
