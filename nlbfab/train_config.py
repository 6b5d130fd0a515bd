"""A training run's settings, kept apart from the loop so that commands parse options without
importing torch.

Each setting is declared once, as a ``TrainConfig`` field with its default, valid values and
help text; ``nlbfab-train``'s options are generated from these fields, and a config that breaks
a rule cannot be built, so bad values fail before any work, wherever a config comes from.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields, replace

from nlbfab.errors import UserError
from nlbfab.layout import check_run_tag
from nlbfab.splits import Split, get_split

# the stopping rule counts epochs, so an epoch should take a few optimizer steps on every dataset
BATCHES_PER_EPOCH = 5
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
MAX_SEED = 2 ** 32 - 1  # Fabric's seed_everything silently picks another seed above this


@dataclass(frozen=True)
class Valid:
    """The values a setting accepts: a number range (either end open or closed, ``None`` for
    unbounded) or a list of choices."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()

    def accepts(self, value) -> bool:
        if self.choices:
            return value in self.choices
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def help_suffix(self) -> str:
        """`` Valid: ...`` for a number range, for an option's help; choices show themselves."""
        return f" Valid: {self.describe()}." if self.low is not None or self.high is not None else ""

    def describe(self) -> str:
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(value) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True)
class Hyperparameter:
    """A model's hyperparameter, declared beside its ``init``: default, help and valid values.
    ``nlbfab-train`` takes it as an option named after it (``hidden_size``: ``--hidden-size``).
    ``with_splits_only``: it acts only with ``--with-splits`` (a run without refuses it)."""

    default: int | float | str
    help: str
    valid: Valid = Valid()
    with_splits_only: bool = False


def setting(default, help: str, valid: Valid = Valid(), option: bool = True):
    """A ``TrainConfig`` field: its default, its command-line help and its valid values."""
    return field(default=default, metadata={"help": help, "valid": valid, "option": option})


POSITIVE = Valid(low=0, low_open=True)
AT_LEAST_ONE = Valid(low=1)
NON_NEGATIVE = Valid(low=0)
BELOW_ONE = Valid(low=0, high=1, high_open=True)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; saved as ``config.json`` and logged as hyperparameters."""

    split: str = field(metadata={"help": "Split to train on, e.g. mc_maze-20ms-val.", "valid": Valid(), "option": False})
    model: str = setting("sae", "Model by name (see nlbfab.models.MODELS).")
    batch_size: int | None = setting(
        None, "Trials per optimizer step; a size above the trials an epoch trains on makes one batch an epoch "
        "[default: a fifth of the train trials, between 16 and 64].", AT_LEAST_ONE)
    learning_rate: float = setting(5e-3, "AdamW's initial learning rate.", POSITIVE)
    weight_decay: float = setting(1e-4, "AdamW's decoupled weight decay.", NON_NEGATIVE)
    dropout: float = setting(0.2, "Dropout probability (inputs, encoder states, initial condition).",
                             BELOW_ONE)
    grad_clip: float = setting(5.0, "Max gradient norm (0: off).", NON_NEGATIVE)
    seed: int = setting(0, "Random seed: initialisation, batches and dropout.", Valid(low=0, high=MAX_SEED))
    ensemble: int = setting(
        1, "Train this many members together, seeded SEED, SEED+1, ...; the submission holds the mean of their "
           "rates.", AT_LEAST_ONE)
    ensemble_top: int | None = setting(
        None, "Submit the mean of at most this many members, chosen greedily by val co-bps while each raises the "
              "mean's; the test phase reuses its val run's choice [default: all members].", AT_LEAST_ONE)
    average_decay: float | None = setting(
        None, "Validate, keep and submit an exponential moving average of the weights, updated after every step "
              "with this decay (0: off, the weights as trained) [default: the model's AVERAGE_DECAY: 0.995 for "
              "lfads, 0 for the others].", BELOW_ONE)
    train_eval_heldin: bool | None = setting(
        None, "Also train on the eval trials' held-in spikes, the model's input in any case (their held-out neurons "
              "and forward bins stay unknown); on the test phase a fixed fifth of those entries is monitored "
              "instead of trained on [default: the model's TRAIN_EVAL_HELDIN: on for lfads, off for the others].")
    train_test_heldin: bool = setting(
        False, "Val phase: also train on the held-in spikes of the dataset's test trials (their held-out neurons "
               "and forward bins are no one's), read from its test split (prepare it); with --with-splits each val "
               "split's. The test phase's test trials are its eval trials: --train-eval-heldin decides there.")
    with_splits: str = setting(
        "", "Also train on these splits, comma-separated (other datasets, the same bin width): one model whose "
            "dynamics they share, each split with a read-in and read-out of its own (models that can: lfads); "
            "SPLIT alone is validated, stopped on and submitted.")
    max_epochs: int = setting(400, "Stop after this many epochs at the latest.", AT_LEAST_ONE)
    # over two plateaus, so that a decayed rate gets its own: at 25 with 15-epoch plateaus,
    # mc_maze_medium stopped 10 epochs after its first decay, 0.001 co-bps short of 2,000 epochs
    patience: int = setting(30, "Stop after this many epochs without a better monitored value.", AT_LEAST_ONE)
    lr_decay: float = setting(
        0.5, "Multiply the learning rate by this after every --lr-patience epochs without a better monitored "
             "value (1: constant, nlb-lightning's schedule).", Valid(low=0, high=1, low_open=True))
    # 12, not 15: mc_maze stops at 123 epochs instead of 184, all three mc_maze sizes still above
    # the 2,000-epoch schedule's co-bps; 10 left mc_maze_small below it (benchmarks/README.md)
    lr_patience: int = setting(12, "Epochs without a better monitored value before each learning-rate decay.",
                               AT_LEAST_ONE)
    min_lr: float = setting(1e-3, "Stop at a plateau whose decay would take the learning rate below this "
                                  "(below --learning-rate).", NON_NEGATIVE)
    # a write costs a fraction of an epoch on small datasets, an ensemble's more: every epoch
    # was too often (benchmarks/README.md, Ensembles)
    checkpoint_every: float = setting(
        30.0, "Write the checkpoints after the first epoch, then at most once in this many seconds, and when the "
              "run stops (0: every epoch); a killed run resumes from the last one written.", NON_NEGATIVE)
    log_every_n_epochs: int = setting(25, "Run the hooks (metrics, rasters, trajectories) this often, and at the end.",
                                      AT_LEAST_ONE)
    save_latents: bool = setting(
        False, "Write the submitted model's latents (and inferred inputs, for a model that infers them) of every "
               "train and eval trial to latents.h5 in the run folder.")
    precision: str = setting("32-true", "Numeric precision (Fabric's names).", Valid(choices=PRECISIONS))
    accelerator: str = setting("auto", "Device type; auto picks a GPU where there is one.", Valid(choices=ACCELERATORS))
    devices: str = setting("1", "How many devices (a positive number, or auto), or GPU indices such as 0,2.")
    strategy: str = setting("auto", "Fabric's strategy: auto, ddp, ddp_spawn, ...")
    run_tag: str = setting("default", "Runs go to RUNS_HOME/RUN_TAG/SPLIT.")
    # the model's own hyperparameters (nlbfab.models), those not given take the model's defaults
    hparams: dict = field(default_factory=dict, metadata={"help": "", "valid": Valid(), "option": False})

    def __post_init__(self):
        check(self)


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_value(name: str, value, valid: Valid) -> None:
    """One line naming the option, the value and what is valid, if ``valid`` refuses ``value``."""
    if value is not None and not valid.accepts(value):
        raise UserError(f"{option_name(name)} {value}: must be {valid.describe()}")


def check_typed(name: str, value, kind: type, valid: Valid) -> None:
    """``check_value`` after the type: JSON has no int/float distinction a user would mind (0 is a
    fine dropout) but a whole-number parameter must get whole numbers and ``true`` is no number."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    fits = isinstance(value, str) if kind is str else whole or kind is float and isinstance(value, float)
    if not fits:
        what = "a whole number" if kind is int else "a number" if kind is float else "a string"
        raise UserError(f"{option_name(name)} {json.dumps(value)}: must be {what}")
    check_value(name, value, valid)


def check(config: TrainConfig) -> None:
    """Raise a one-line ``UserError`` for the first setting no run can use, naming its option,
    the value and what is valid (a model's hyperparameters are checked by the model)."""
    for f in fields(config):
        check_value(f.name, getattr(config, f.name), f.metadata["valid"])
    if config.min_lr >= config.learning_rate:
        raise UserError(f"--min-lr {config.min_lr:g} must be below --learning-rate {config.learning_rate:g}: "
                        f"the run would stop at its first plateau")
    if config.ensemble_top and config.ensemble_top > config.ensemble:
        raise UserError(f"--ensemble-top {config.ensemble_top}: must be at most --ensemble ({config.ensemble})")
    if config.seed + config.ensemble - 1 > MAX_SEED:
        raise UserError(f"--seed {config.seed}: members are seeded up to SEED + {config.ensemble - 1}, which must be at "
                        f"most {MAX_SEED}")
    if not re.fullmatch(r"auto|[1-9][0-9]*|[0-9]+,|[0-9]+(,[0-9]+)+", config.devices):
        raise UserError(f"--devices {config.devices}: must be a positive number, auto, or GPU indices such as 0,2")
    check_run_tag(config.run_tag)
    companion_splits(config)


def with_split_names(with_splits: str) -> list[str]:
    """The names in a ``--with-splits`` value (comma-separated; empty: none)."""
    return [name.strip() for name in with_splits.split(",")] if with_splits else []


def companion_splits(config: TrainConfig) -> list[Split]:
    """The splits of ``--with-splits``: each another dataset than the run's split and the others
    (one dataset's splits share trials: its test phase trains on the val phase's eval trials),
    at the run's bin width (the model steps through bins of one width)."""
    if not config.with_splits:
        return []
    split = get_split(config.split)
    try:
        companions = [get_split(name) for name in with_split_names(config.with_splits)]
    except UserError as error:
        raise UserError(f"--with-splits: {error}") from None
    datasets = [s.dataset.name for s in (split, *companions)]
    repeated = next((name for name in datasets if datasets.count(name) > 1), None)
    if repeated:
        raise UserError(f"--with-splits {config.with_splits}: {repeated} appears twice with --split {split.name}; "
                        f"give each dataset once (one dataset's splits share trials)")
    other_width = next((s for s in companions if s.bin_ms != split.bin_ms), None)
    if other_width:
        raise UserError(f"--with-splits: {other_width.name} has {other_width.bin_ms} ms bins, --split {split.name} "
                        f"{split.bin_ms} ms; give splits of one bin width")
    return companions


def auto_batch_size(train_trials: int) -> int:
    """Batches of 64 trials, smaller on small datasets so that an epoch still takes about
    ``BATCHES_PER_EPOCH`` optimizer steps (never under 16 trials). mc_maze_small's 75 train trials
    made 2 batches of 64 an epoch: it took 241 epochs to stop, against 151 with 16, at better
    co-bps (with 15-epoch plateaus; benchmarks/README.md)."""
    return max(16, min(64, math.ceil(train_trials / BATCHES_PER_EPOCH)))


def with_batch_size(config: TrainConfig, train_trials: int) -> TrainConfig:
    """``config`` with its batch size settled: the given one, else ``auto_batch_size``."""
    return config if config.batch_size else replace(config, batch_size=auto_batch_size(train_trials))
