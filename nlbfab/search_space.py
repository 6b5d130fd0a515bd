"""A hyperparameter search space: each parameter's distribution, declared by the model beside its
``HPARAMS`` (``SEARCH_SPACE``) and overridable from a small JSON file, checked against the
parameter's valid values before any trial runs.

A space maps a name, either a ``TrainConfig`` field in ``SEARCHABLE`` or one of the model's
hyperparameters, to a ``Distribution``. In a space file (and in the search's saved plan) a
distribution is one key naming its kind with a list: ``{"loguniform": [1e-4, 1e-2]}``,
``{"uniform": [0, 0.5]}``, ``{"int": [1, 10]}`` (both ends included), ``{"choice": [32, 64]}``;
a plain value fixes the parameter for every trial and ``null`` drops it from the model's space
(it keeps its default); a YAML file says the same. Nothing here imports Ray: ``to_tune`` does,
when a search starts.
"""
from __future__ import annotations

import json
import re
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from nlbfab.errors import UserError
from nlbfab.train_config import TrainConfig, Valid, check_typed

KINDS = ("uniform", "loguniform", "int", "choice")
# the TrainConfig fields a search may vary: how a model learns, not where or how long it runs
# (--max-epochs bounds the scheduler's trials) or what it is
SEARCHABLE = ("batch_size", "learning_rate", "weight_decay", "dropout", "grad_clip", "seed", "patience", "lr_decay",
              "lr_patience", "min_lr", "average_decay")


@dataclass(frozen=True)
class Distribution:
    """How a search draws one parameter: ``kind`` (one of ``KINDS``) and ``values``, the range's
    ``(low, high)`` or the choices."""

    kind: str
    values: tuple

    def to_json(self) -> dict:
        return {self.kind: list(self.values)}

    def describe(self) -> str:
        return json.dumps(self.to_json())

    def to_tune(self):
        """The Ray Tune domain (which ``OptunaSearch`` turns into Optuna's distribution)."""
        from ray import tune
        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        if self.kind == "int":
            return tune.randint(low, high + 1)  # Tune's upper end is excluded
        return (tune.loguniform if self.kind == "loguniform" else tune.uniform)(low, high)


def uniform(low: float, high: float) -> Distribution:
    return Distribution("uniform", (low, high))


def loguniform(low: float, high: float) -> Distribution:
    return Distribution("loguniform", (low, high))


def integer(low: int, high: int) -> Distribution:
    """Whole numbers from ``low`` to ``high``, both included."""
    return Distribution("int", (low, high))


def choice(*values) -> Distribution:
    return Distribution("choice", tuple(values))


def parameters(model) -> dict[str, tuple[type, Valid]]:
    """What a search over ``model`` (``nlbfab.models.Model``) may vary: each parameter's type and
    valid values, the ``SEARCHABLE`` training settings and the model's hyperparameters."""
    hints = typing.get_type_hints(TrainConfig)
    settings = {f.name: (next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)),
                         f.metadata["valid"]) for f in fields(TrainConfig) if f.name in SEARCHABLE}
    return settings | {name: (type(h.default), h.valid) for name, h in model.hparams.items()}


def parse(name: str, entry) -> Distribution | int | float | str | None:
    """A space file's entry: a ``Distribution``, a fixed value, or None (dropped)."""
    if entry is None or isinstance(entry, (int, float, str)) and not isinstance(entry, bool):
        return entry
    if not (isinstance(entry, dict) and len(entry) == 1):
        raise UserError(f"{name}: {json.dumps(entry)} is neither a value nor one distribution such as "
                        f'{{"loguniform": [0.001, 0.01]}}')
    (kind, values), = entry.items()
    if kind not in KINDS:
        raise UserError(f"{name}: unknown distribution {kind!r} (use {', '.join(KINDS)})")
    if not isinstance(values, list) or not values or (kind != "choice" and len(values) != 2):
        raise UserError(f"{name}: {kind} needs " + ("a non-empty list of values" if kind == "choice" else
                                                    "a list [low, high]") + f", not {json.dumps(values)}")
    return Distribution(kind, tuple(values))


def check_entry(name: str, value, kind: type, valid: Valid) -> None:
    """One line if a fixed ``value`` or a distribution's end or choice is not a ``kind`` that
    ``valid`` accepts; a range must also run upwards (and above 0 for ``loguniform``)."""
    if not isinstance(value, Distribution):
        check_typed(name, value, kind, valid)
        return
    numeric = [v for v in value.values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if value.kind != "choice":
        if len(numeric) != 2:
            raise UserError("the ends must be numbers")
        if kind is int and (value.kind != "int" or not all(isinstance(v, int) for v in value.values)):
            raise UserError("a whole-number parameter needs int, or choice of whole numbers")
        if kind is str or kind is float and value.kind == "int":
            raise UserError("use " + ("choice" if kind is str else "uniform, loguniform or choice"))
        low, high = value.values
        if not low < high:
            raise UserError("low must be below high")
        if value.kind == "loguniform" and low <= 0:
            raise UserError("loguniform needs low > 0")
    for v in value.values:
        check_typed(name, v, kind, valid)


def read_space(path: Path) -> dict:
    """A space file's entries (``parse``d), or one line saying why it cannot be used. JSON, or
    YAML where the name ends in ``.yaml``/``.yml`` (PyYAML comes with Ray)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--space {path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    if Path(path).suffix in (".yaml", ".yml"):
        import yaml
        kind, load, errors = "YAML", _yaml_loader(yaml), yaml.YAMLError
    else:
        kind, load, errors = "JSON", json.loads, json.JSONDecodeError
    try:
        entries = load(text)
    except errors as error:
        raise UserError(f"--space {path}: not {kind} ({str(error).strip().splitlines()[0]})") from None
    if not isinstance(entries, dict):
        raise UserError(f"--space {path}: must map parameter names to distributions or values")
    try:
        return {name: parse(name, entry) for name, entry in entries.items()}
    except UserError as error:
        raise UserError(f"--space {path}: {error}") from None


def _yaml_loader(yaml):
    """``yaml.safe_load`` that reads ``1e-3`` as the number YAML 1.2 and JSON make it (PyYAML
    follows YAML 1.1, where a float needs a dot: ``1e-3`` would be the string "1e-3")."""
    class Loader(yaml.SafeLoader):
        pass
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    return lambda text: yaml.load(text, Loader=Loader)


def settle(model, overrides: dict, given: set[str]) -> tuple[dict[str, Distribution], dict]:
    """The space a search draws from and the values it fixes: the model's ``SEARCH_SPACE``
    updated by ``overrides`` (a space file's entries: ``None`` drops one, a plain value fixes it),
    without the parameters ``given`` on the command line (those fix their own). Every entry is
    checked against the parameter's type and valid values."""
    known = parameters(model)
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise UserError(f"the search space names {', '.join(unknown)}: not a parameter of model {model.name} "
                        f"(searchable: {', '.join(known)})")
    merged = {name: value for name, value in (model.search_space | overrides).items()
              if value is not None and name not in given}
    for name, value in merged.items():
        try:
            check_entry(name, value, *known[name])
        except UserError as error:
            where = f"search space {name} {value.describe()}" if isinstance(value, Distribution) else "search space"
            raise UserError(f"{where}: {error}") from None
    space = {n: v for n, v in merged.items() if isinstance(v, Distribution)}
    return space, {n: v for n, v in merged.items() if not isinstance(v, Distribution)}


def split_settings(values: dict, model) -> tuple[dict, dict]:
    """``values`` by parameter name into ``TrainConfig`` fields and the model's hyperparameters."""
    hparams = {n: v for n, v in values.items() if n in model.hparams}
    return {n: v for n, v in values.items() if n not in hparams}, hparams


def space_to_json(space: dict[str, Distribution]) -> dict:
    return {name: d.to_json() for name, d in space.items()}


def space_from_json(entries: dict) -> dict[str, Distribution]:
    return {name: parse(name, entry) for name, entry in entries.items()}


def check_trials(split: str, fixed: dict, space: dict[str, Distribution], model) -> None:
    """Build the settings of a trial at each end of every range (and at every choice), with the
    fixed values, so that a rule between settings (``--min-lr`` below ``--learning-rate``) fails
    now in one line rather than in a trial."""
    settings, hparams = split_settings(fixed, model)
    for name, distribution in space.items():
        for value in distribution.values:
            own, own_hparams = split_settings({name: value}, model)
            try:
                TrainConfig(split=split, **(settings | own), hparams=hparams | own_hparams)
                model.settle(hparams | own_hparams, with_splits=bool(fixed.get("with_splits")))
            except UserError as error:
                raise UserError(f"search space {name} {distribution.describe()}: {error}") from None
