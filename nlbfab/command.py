"""Click plumbing shared by every command: one ``error:`` line for any bad input, and
``nlbfab-train``'s options generated from ``TrainConfig``'s fields."""
from __future__ import annotations

import difflib
import functools
import json
import logging
import sys
import typing
import warnings
from dataclasses import fields
from pathlib import Path

import click
from click.core import ParameterSource

from nlbfab.errors import UserError
from nlbfab.splits import DATASETS, get_dataset
from nlbfab.train_config import TrainConfig, check_typed, option_name


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
    valid values come from the field, so a setting is declared in one place; and ``--config``,
    a file of settings that the other options override."""
    hints = typing.get_type_hints(TrainConfig)
    for f in reversed([f for f in fields(TrainConfig) if f.metadata["option"]]):
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        valid = f.metadata["valid"]
        if kind is bool:  # a flag: given or not; with no default of its own, --name/--no-name
            names = option_name(f.name) + ("" if f.default is not None else f"/--no-{option_name(f.name)[2:]}")
            command = click.option(names, f.name, is_flag=True, default=f.default,
                                   help=f.metadata["help"])(command)
            continue
        command = click.option(option_name(f.name), f.name, default=f.default, show_default=f.default is not None,
                               type=click.Choice(valid.choices) if valid.choices else kind,
                               help=f.metadata["help"] + valid.help_suffix())(command)
    return click.option("--config", "config", type=click.Path(dir_okay=False), is_eager=True, callback=read_config,
                        help="Take the settings (and --split) of this JSON file, e.g. a run's config.json or a "
                             "search's best.json; options given here override them.")(command)


def read_config(ctx: click.Context, param, path: str | None) -> dict:
    """``--config FILE``: the file's settings become the defaults of ``nlbfab-train``'s options
    (click's ``default_map``: an option given on the command line still wins). Returns the file's
    model hyperparameters, which ``train_config`` puts under the options the model takes."""
    if path is None:
        return {}
    try:
        settings = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise click.BadParameter(f"{path}: cannot read it as JSON ({getattr(error, 'strerror', None) or error})")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(settings) - known) if isinstance(settings, dict) else ["(not a JSON object)"]
    if unknown:
        raise click.BadParameter(f"{path}: not settings of nlbfab-train: {', '.join(unknown)}")
    nulls = [f.name for f in fields(TrainConfig) if f.default is not None and settings.get(f.name, "") is None]
    if nulls:  # click would pass them on, and the run fail in a traceback
        raise click.BadParameter(f"{path}: {', '.join(nulls)} cannot be null: give a value or leave it out")
    for f in fields(TrainConfig):  # click would cut 2.5 to 2 and read true as 1
        if type(f.default) in (int, float) and settings.get(f.name) is not None:
            try:
                check_typed(f.name, settings[f.name], type(f.default), f.metadata["valid"])
            except UserError as error:
                raise click.BadParameter(f"{path}: {error}") from None
    hparams = settings.get("hparams") or {}
    if not isinstance(hparams, dict):
        raise click.BadParameter(f"{path}: hparams must be an object of the model's hyperparameters, e.g. "
                                 f'{{"hidden_size": 64}}')
    names = {"split": "split_name"}  # --split's parameter name
    ctx.default_map = (ctx.default_map or {}) | {names.get(k, k): v for k, v in settings.items() if k != "hparams"}
    return hparams


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


class TrainCommand(Command):
    """``nlbfab-train``: its own options come from ``TrainConfig``; what is left are the chosen
    model's hyperparameters (``model_hparams``), which ``--help`` lists for the built-in models."""

    def format_epilog(self, ctx, formatter):
        from nlbfab.models import MODELS
        rows = [(f"{option_name(name)} [{model.name}]", f"{h.help} {model.default_help(name)}{h.valid.help_suffix()}")
                for model in MODELS.values() for name, h in model.hparams.items()]
        with formatter.section("Model hyperparameters of the built-in models (each takes its own; a --model module "
                               "of yours takes those of its HPARAMS)"):
            formatter.write_dl(rows)


def model_hparams(model_name: str, args: list[str]) -> dict:
    """The chosen model's hyperparameters from the options that ``nlbfab-train``'s own did not
    take, checked against the model's declaration (an unknown option fails here, in one line)."""
    from nlbfab.models import get_model
    model = get_model(model_name)
    options = [click.Option([option_name(name)], name, type=type(h.default)) for name, h in model.hparams.items()]
    try:
        parsed = click.Command("hparams", params=options).make_context(f"nlbfab-train --model {model.name}", list(args))
    except click.NoSuchOption as error:
        known = ", ".join(option_name(n) for n in model.hparams) or "none"
        everything = [option_name(f.name) for f in fields(TrainConfig) if f.metadata["option"]] + known.split(", ")
        close = difflib.get_close_matches(error.option_name, everything, n=1)
        raise UserError(f"no such option {error.option_name}" + (f" (did you mean {close[0]}?)" if close else "")
                        + f": not one of nlbfab-train's (see --help) nor of model {model.name}'s hyperparameters "
                        f"({known})") from None
    given = {k: v for k, v in parsed.params.items() if v is not None}
    model.settle(given)
    return given


def train_config(split: str, options: dict, extra_args: list[str]) -> TrainConfig:
    """A checked ``TrainConfig`` from ``nlbfab-train``'s parsed options and the model's own (those
    of a ``--config`` file, overridden by those given)."""
    from nlbfab.models import get_model
    options = dict(options)
    model = get_model(options["model"])
    from_file = options.pop("config", None) or {}
    if not options.get("with_splits"):  # a file's are a settled run's: those for its companions do not apply here
        from_file = {k: v for k, v in from_file.items() if k not in model.only_with_splits(from_file)}
    for name, value in from_file.items():  # the command line's are typed by click, a file's here
        if name in model.hparams:
            check_typed(name, value, type(model.hparams[name].default), model.hparams[name].valid)
    hparams = from_file | model_hparams(options["model"], extra_args)
    model.settle(hparams)  # a file's hyperparameters are checked too
    return TrainConfig(split=split, hparams=hparams, **options)


def check_pass_through(train_command: click.Command, args: list[str]) -> TrainConfig:
    """``nlbfab-all``'s options for every ``nlbfab-train`` run, checked before any split is
    prepared or trained; returns a run's settings with them."""
    if any(a in ("--split", "--run-tag", "--resume") for a in args):
        raise UserError("--split, --run-tag and --resume are nlbfab-all's own: use --datasets/--bins/--phases")
    placed = [a.split("=")[0] for a in args if a.split("=")[0] in ("--accelerator", "--devices")]
    if placed:
        raise UserError(f"{placed[0]} is not for nlbfab-all's runs: each gets one GPU or CPU worker of its placement "
                        f"(--jobs-per-gpu, --workers, --gpus-per-run)")
    if any(a.split("=")[0] == "--with-splits" for a in args):
        raise UserError("--with-splits is not for nlbfab-all: its splits would train with the same companions, "
                        "their own datasets' among them; use --share-datasets")
    context = train_command.make_context("nlbfab-train", ["--split", "mc_maze-20ms-val", *args])
    options = {k: v for k, v in context.params.items() if k not in ("split_name", "resume", "quiet")}
    return train_config("mc_maze-20ms-val", options, context.args)


def given_train_options(train_command: click.Command, split: str, args: list[str]) -> dict:
    """The ``nlbfab-train`` options given in ``args`` (not those left at their defaults) and the
    model's hyperparameters given, by setting name: what ``nlbfab-search`` fixes for every trial.
    All of them are checked as a run's would be."""
    from nlbfab.models import get_model
    refused = [a.split("=")[0] for a in args if a.split("=")[0] in ("--quiet", "--config", "--accelerator", "--devices")]
    if refused:
        raise UserError(f"{refused[0]} is not for nlbfab-search's trials (they run quietly on one device each, CPU "
                        f"or GPU as --gpus-per-trial gives them, with the settings given here and those drawn for them)")
    context = train_command.make_context("nlbfab-train", ["--split", split, *args])
    options = {k: v for k, v in context.params.items() if k not in ("split_name", "resume", "quiet")}
    run_config = train_config(split, options, context.args)
    get_model(run_config.model).settle(run_config.hparams, with_splits=bool(run_config.with_splits))
    hparams = run_config.hparams
    given = {k: v for k, v in options.items() if context.get_parameter_source(k) is ParameterSource.COMMANDLINE}
    return given | hparams


def chosen_datasets(names: tuple[str, ...], all_: bool) -> list:
    """The datasets named by ``--dataset`` (repeatable), or all of them with ``--all``."""
    if all_ and names:
        raise UserError("--all or --dataset, not both")
    if all_:
        return list(DATASETS.values())
    if not names:
        raise UserError(f"name at least one --dataset ({', '.join(DATASETS)}) or use --all")
    return [get_dataset(n) for n in names]
