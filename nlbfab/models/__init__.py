"""Models as pure functions with their hyperparameters, selected by name on the command line.

A model is a module (or any object) with ``init(sizes, seed, **hparams) -> params`` (a plain
dict of tensors), ``apply(params, heldin, fwd_steps, *, dropout, training) -> (logrates,
latents)`` with ``heldin: (trials, bins, heldin)``, ``logrates: (trials, bins + fwd_steps,
heldin + heldout)`` and ``latents: (trials, bins + fwd_steps, latent_dim)``, and ``HPARAMS``:
its hyperparameters (``nlbfab.train_config.Hyperparameter``: default, help, valid values), which
``nlbfab-train`` takes as options. The loop, the hooks, the checkpoints and the submission need
nothing else; ``SEARCH_SPACE``, where a model declares one, is what ``nlbfab-search`` draws its
trials from (``nlbfab.search_space``). Register one in ``MODELS``, or name an importable module with ``--model
my_package.my_model``.

Eight optional parts let a model train in its own way and show more of itself (the SAE and
``gru_readout`` have none):
``training_loss(params, heldin, target, *, dropout, epoch) -> (loss, terms)`` replaces the
Poisson loss of ``apply``'s training-mode rates: it may transform the batch (LFADS's coordinated
dropout), add loss terms (KL, L2; ``terms``, a dict of scalars, is logged as ``loss/{name}``)
and use the epoch for warm-ups; ``FIXED``, the names of entries of ``params`` that are not
trained (settings and fixed priors, kept with the weights so that ``apply`` needs nothing else);
``AVERAGE_DECAY``, the default of ``--average-decay`` for the model (0, off, where absent);
``TRAIN_EVAL_HELDIN``, the default of ``--train-eval-heldin`` (off where absent);
``DATASET_DEFAULTS``, per dataset name the hyperparameters whose defaults differ there (LFADS's
sizes from lfads-torch's per-dataset configs); and
``inferred_inputs(params, heldin, fwd_steps) -> (trials, bins + fwd_steps, inputs)``, the inputs
from outside the dynamics that the model infers at each step (LFADS's controller outputs,
posterior means), which the hooks plot (``nlbfab.hooks.inputs_hook``);
``submission_apply_members(members, heldin, fwd_steps)``, ``apply_members`` in eval mode as the
submission's rates take it (LFADS's averages passes under coordinated dropout; validation and the
choice of members keep the one plain pass).
``SHARES_ACROSS_SPLITS``: the model trains with ``--with-splits``: its ``init`` reads the other
splits' ``Sizes`` from ``sizes.companions``, and ``apply`` and ``training_loss`` take ``session=k``
for the k-th of them (0, the default, is the run's own split, all that validation, the hooks and
the submission see). A hyperparameter that acts only then declares ``with_splits_only`` (a run,
search or sweep split without companions refuses it given, and leaves it out of its config).

An ensemble (``--ensemble K``) runs K members, each with its own parameter dict. A model may
give their batched form, ``apply_members(members, heldin, fwd_steps, *, dropout, training) ->
(logrates (K, trials, bins + fwd, neurons), latents (K, ...))``, equal to stacking ``apply`` of
each member, and with its own ``training_loss``, ``training_loss_members(members, heldin, target,
*, dropout, epoch) -> (losses (K,), terms {name: (K,)})``; the SAE's and LFADS's step every
member's recurrences together. Without them the members run one after another in the same step
(``torch.func.vmap`` cannot batch them: the GRU kernels are autograd Functions and spike dropout
draws a mask of data-dependent size).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

from nlbfab.errors import UserError
from nlbfab.models import gru_readout, lfads, sae
from nlbfab.train_config import BELOW_ONE, Hyperparameter, check_value, option_name


@dataclass(frozen=True)
class Sizes:
    """What a model's ``init`` needs to know about the split."""

    heldin: int
    heldout: int
    bins: int
    fwd_steps: int
    mean_counts: torch.Tensor  # (heldin + heldout,) mean spikes per bin on train trials
    companions: tuple["Sizes", ...] = ()  # the splits of --with-splits, for a model that shares across splits


@dataclass(frozen=True)
class Model:
    """A model by name: its module's ``init`` and ``apply``, and its ``HPARAMS``."""

    name: str
    module: Any

    @property
    def hparams(self) -> dict[str, Hyperparameter]:
        return getattr(self.module, "HPARAMS", {})

    @property
    def search_space(self) -> dict:
        """The model's ``SEARCH_SPACE`` (``nlbfab.search_space``): what ``nlbfab-search`` draws from."""
        return getattr(self.module, "SEARCH_SPACE", {})

    @property
    def apply(self):
        return self.module.apply

    @property
    def training_loss(self):
        """The model's own training objective, or None for the Poisson loss of ``apply``."""
        return getattr(self.module, "training_loss", None)

    @property
    def inferred_inputs(self):
        """The model's ``inferred_inputs``, or None where it infers none."""
        return getattr(self.module, "inferred_inputs", None)

    @property
    def dataset_defaults(self) -> dict[str, dict]:
        """The model's ``DATASET_DEFAULTS``: per dataset, the hyperparameters whose defaults differ there."""
        return getattr(self.module, "DATASET_DEFAULTS", {})

    def default_help(self, name: str) -> str:
        """``name``'s default for ``--help``, with the datasets where it differs."""
        per_value: dict = {}
        for dataset, overrides in self.dataset_defaults.items():
            if name in overrides and overrides[name] != self.hparams[name].default:
                per_value.setdefault(overrides[name], []).append(dataset)
        elsewhere = "".join(f"; {value} on {', '.join(datasets)}" for value, datasets in per_value.items())
        return f"[default: {self.hparams[name].default}{elsewhere}]"

    @property
    def shares_across_splits(self) -> bool:
        """Whether the model can train with ``--with-splits`` (its ``SHARES_ACROSS_SPLITS``)."""
        return bool(getattr(self.module, "SHARES_ACROSS_SPLITS", False))

    @property
    def fixed(self) -> tuple[str, ...]:
        return tuple(getattr(self.module, "FIXED", ()))

    def average_decay(self, given: float | None) -> float:
        """``--average-decay``: ``given``, else the model's ``AVERAGE_DECAY`` (0, off, where it has none)."""
        decay = getattr(self.module, "AVERAGE_DECAY", 0.0) if given is None else given
        check_value("average_decay", decay, BELOW_ONE)
        return decay

    def train_eval_heldin(self, given: bool | None) -> bool:
        """``--train-eval-heldin``: ``given``, else the model's ``TRAIN_EVAL_HELDIN`` (off where it has none)."""
        return bool(getattr(self.module, "TRAIN_EVAL_HELDIN", False)) if given is None else given

    def apply_members(self, members: list[dict], heldin, fwd_steps: int, *, dropout: float, training: bool):
        """``apply`` of each member, stacked: ``(logrates (K, ...), latents (K, ...))``; the model's
        batched ``apply_members`` where it has one and there is more than one member."""
        batched = getattr(self.module, "apply_members", None)
        if batched and len(members) > 1:
            return batched(members, heldin, fwd_steps, dropout=dropout, training=training)
        outputs = [self.apply(p, heldin, fwd_steps, dropout=dropout, training=training) for p in members]
        return torch.stack([o[0] for o in outputs]), torch.stack([o[1] for o in outputs])

    def submission_apply_members(self, members: list[dict], heldin, fwd_steps: int):
        """The submission's rates and latents: the model's ``submission_apply_members`` where it
        has one, else ``apply_members`` in eval mode."""
        own = getattr(self.module, "submission_apply_members", None)
        if own:
            return own(members, heldin, fwd_steps)
        return self.apply_members(members, heldin, fwd_steps, dropout=0.0, training=False)

    def training_loss_members(self, members: list[dict], heldin, target, *, dropout: float, epoch: int,
                              session: int = 0):
        """``training_loss`` of each member: ``(losses (K,), terms {name: (K,)})``; the model's
        batched ``training_loss_members`` where it has one and there is more than one member.
        ``session`` reaches the model only where it is a companion's (``--with-splits``)."""
        batched = getattr(self.module, "training_loss_members", None)
        by_session = {"session": session} if session else {}
        if batched and len(members) > 1:
            return batched(members, heldin, target, dropout=dropout, epoch=epoch, **by_session)
        losses, terms = zip(*(self.training_loss(p, heldin, target, dropout=dropout, epoch=epoch, **by_session)
                              for p in members))
        return torch.stack(losses), {name: torch.stack([t[name] for t in terms]) for name in terms[0]}

    def settle(self, given: dict, dataset: str | None = None, with_splits: bool = True) -> dict:
        """The model's hyperparameters: its defaults (for ``dataset``, where the model declares
        some in ``DATASET_DEFAULTS``), overridden by ``given``; an unknown name or a value out of
        range fails in one line. For a run without ``--with-splits`` (``with_splits`` False), those
        that act only with it are refused when given and left out of the rest, so that a run's
        config.json holds only what it uses."""
        unknown = sorted(set(given) - set(self.hparams))
        if unknown:
            known = ", ".join(option_name(n) for n in self.hparams) or "none"
            raise UserError(f"model {self.name} has no {', '.join(option_name(n) for n in unknown)} (its hyperparameters: {known})")
        for name, value in given.items():
            check_value(name, value, self.hparams[name].valid)
        unused = [] if with_splits else self.only_with_splits(given)
        if unused:
            raise UserError(f"{option_name(unused[0])} acts only with --with-splits: add --with-splits or drop it")
        defaults = {name: h.default for name, h in self.hparams.items() if with_splits or not h.with_splits_only}
        defaults |= self.dataset_defaults.get(dataset, {})
        return defaults | given

    def only_with_splits(self, hparams: dict) -> list[str]:
        """Those of ``hparams`` (known to the model) that act only with ``--with-splits``."""
        return [name for name in hparams if name in self.hparams and self.hparams[name].with_splits_only]

    def init(self, sizes: Sizes, seed: int, **hparams) -> dict[str, torch.Tensor]:
        """``init`` with every hyperparameter: those not in ``hparams`` take the defaults."""
        return self.module.init(sizes, seed, **self.settle(hparams))


MODELS = {"sae": Model("sae", sae), "gru_readout": Model("gru_readout", gru_readout), "lfads": Model("lfads", lfads)}


def get_model(name: str) -> Model:
    """A registered model, or one from the importable module ``name`` (``my_package.my_model``)."""
    if name in MODELS:
        return MODELS[name]
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        raise UserError(f"unknown model '{name}': choose one of {', '.join(MODELS)}, or name an importable module "
                        f"that defines init, apply and HPARAMS ({error})") from None
    missing = [attr for attr in ("init", "apply") if not callable(getattr(module, attr, None))]
    if missing:
        raise UserError(f"model module {name} lacks {' and '.join(missing)}: see nlbfab/models/__init__.py")
    return Model(name, module)
