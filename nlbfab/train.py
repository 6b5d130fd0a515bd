"""The hand-written Fabric training loop, in the shape of Flax's examples.

``create_train_state`` builds all state in one value; ``train_step`` takes one optimizer step;
``after_epoch`` makes the epoch's decisions (best, plateau, stop) as a pure function of what was
measured; ``train(config, homes, hooks)`` is the single entry point, whose loop reads top to
bottom in the order things run. At the end the best checkpoint predicts the rates that go into
the run's submission. With ``--average-decay`` (LFADS's default) validation, the best checkpoint
and the submission see an exponential moving average of the weights (``WeightAverage``).

An ensemble (``--ensemble K``) is K members in the same loop: one forward and backward for all
(batched where the model has ``apply_members`` and, with its own loss, ``training_loss_members``),
each member with its own optimizer param group, so its own learning rate, gradient clipping,
progress, best weights and stop; the run ends when every member has stopped. A single model is an ensemble of one.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from lightning_fabric import Fabric
from lightning_fabric.loggers import TensorBoardLogger
from lightning_fabric.utilities.exceptions import MisconfigurationException
from tqdm import tqdm

from nlbfab import layout
from nlbfab.cores import available_cpus
from nlbfab.data import (SplitData, TrainingPool, batch_indices, load_split, load_test_heldin, train_trials_only,
                         with_eval_heldin, with_test_heldin)
from nlbfab.ensemble import greedy_selection, mean_logrates, val_choice
from nlbfab.errors import UserError, first_line
from nlbfab.evaluation import co_bps, inference_batch, metrics, predict
from nlbfab.hooks import HOOKS
from nlbfab.latents import predict_latents, write_latents
from nlbfab.layout import Homes
from nlbfab.loss import poisson_nll
from nlbfab.memory import keep_freed_buffers
from nlbfab.models import Model, Sizes, get_model
from nlbfab.scoring import local_target, submit_and_score
from nlbfab.splits import get_split
from nlbfab.submission import shapes
from nlbfab.train_config import TrainConfig, auto_batch_size, companion_splits, with_batch_size


class NonFiniteLoss(UserError):
    """The loss or the gradients became NaN or infinite: the run stops before the update."""


class MemberParams(torch.nn.Module):
    """One member's parameter dict; entries the model names ``FIXED`` are buffers, not parameters."""

    def __init__(self, model: Model, params: dict[str, torch.Tensor]):
        super().__init__()
        self.params = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in params.items()
                                              if k not in model.fixed})
        for name in model.fixed:
            self.register_buffer(f"fixed_{name}", params[name])
        self.fixed = model.fixed

    def all_params(self) -> dict[str, torch.Tensor]:
        return dict(self.params) | {name: getattr(self, f"fixed_{name}") for name in self.fixed}


class ParamsModule(torch.nn.Module):
    """The thin object layer Fabric needs: holds each member's parameter dict so that ``setup``
    can wrap them (DDP synchronises gradients through the module's forward), and calls the
    model's pure functions with them."""

    def __init__(self, model: Model, members: list[dict[str, torch.Tensor]]):
        super().__init__()
        self.model = model
        self.members = torch.nn.ModuleList(MemberParams(model, params) for params in members)

    def forward(self, heldin, fwd_steps: int, dropout: float = 0.0, target=None, epoch: int = 0, members=None,
                inputs: bool = False, companions=(), submission: bool = False):
        """The members' ``apply`` outputs stacked, ``(logrates (K, ...), latents (K, ...))``, of all
        members or of those indexed by ``members``. Given a ``target``, the training objective
        ``(loss, terms)`` instead: the sum over members of the model's ``training_loss`` or of
        the Poisson loss (each member's gradient is its own loss's), its terms averaged, plus
        each member's loss on the batches of ``companions``, ``(heldin, target)`` of the
        ``--with-splits`` splits in order (``session`` 1, 2, ...). With ``inputs``, the model's
        ``inferred_inputs`` stacked, ``(K, trials, steps, inputs)``: through ``forward`` like the
        rest, so that Fabric's precision and DDP wrappers see every use. With ``submission``, the
        model's ``submission_apply_members`` (eval mode)."""
        chosen = self.members if members is None else [self.members[k] for k in members]
        params = [member.all_params() for member in chosen]
        if inputs:
            return torch.stack([self.model.inferred_inputs(p, heldin, fwd_steps) for p in params])
        if submission:
            return self.model.submission_apply_members(params, heldin, fwd_steps)
        if target is None:
            return self.model.apply_members(params, heldin, fwd_steps, dropout=dropout, training=self.training)
        loss, terms = self._objective(params, heldin, target, dropout, epoch)
        for session, (companion_heldin, companion_target) in enumerate(companions, 1):
            loss = loss + self._session_loss(params, companion_heldin, companion_target, dropout, epoch, session)
        return loss, terms

    def _objective(self, params: list[dict], heldin, target, dropout: float, epoch: int):
        """The run's own split's part of ``forward``'s training objective."""
        if self.model.training_loss:
            losses, terms = self.model.training_loss_members(params, heldin, target, dropout=dropout, epoch=epoch)
            return losses.sum(), {name: value.mean() for name, value in terms.items()}
        logrates, _ = self.model.apply_members(params, heldin, target.shape[1] - heldin.shape[1], dropout=dropout,
                                               training=True)
        return torch.stack([poisson_nll(member, target) for member in logrates]).sum(), {}

    def _session_loss(self, params: list[dict], heldin, target, dropout: float, epoch: int, session: int):
        """The members' summed training loss on a batch of the ``session``-th ``--with-splits`` split."""
        if self.model.training_loss:
            return self.model.training_loss_members(params, heldin, target, dropout=dropout, epoch=epoch,
                                                    session=session)[0].sum()
        return sum(poisson_nll(self.model.apply(p, heldin, target.shape[1] - heldin.shape[1], dropout=dropout,
                                                training=True, session=session)[0], target) for p in params)


class RNG:
    """The run's random streams: the batch order (its own generator), torch's global stream
    (dropout) and CUDA's. Fabric saves and restores them with the checkpoint, like the model,
    so a resumed run draws what an uninterrupted one would."""

    def __init__(self, seed: int):
        self.batches = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"batches": self.batches.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state: dict) -> None:
        self.batches.set_state(state["batches"])
        torch.set_rng_state(state["torch"])
        if state["cuda"]:
            torch.cuda.set_rng_state_all(state["cuda"])


class WeightAverage:
    """An exponential moving average of the members' weights (``--average-decay``), which
    validation, the hooks, the best checkpoint and the submission use in place of the weights as
    trained: the optimizer's noisy steps wander over the plateau they reach, their average sits
    nearer its middle. Its decay grows with the steps taken, ``(1 + t) / (10 + t)`` up to
    ``decay`` (TensorFlow's ``ExponentialMovingAverage``), so the random initial weights are soon
    forgotten. Fabric saves and restores it with the checkpoint, like the RNG streams."""

    def __init__(self, decay: float, weights: dict[str, torch.Tensor]):
        self.decay, self.steps = decay, 0
        self.weights = {key: value.detach().clone() for key, value in weights.items()}

    def update(self, weights: dict[str, torch.Tensor]) -> None:
        weight = 1 - min(self.decay, (1 + self.steps) / (10 + self.steps))
        for key, value in self.weights.items():
            value.lerp_(weights[key], weight)
        self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        for key, value in self.weights.items():  # in place: the saved tensors may sit on another device
            value.copy_(state["weights"][key])


@dataclass(frozen=True)
class Progress:
    """Where a model (an ensemble's member) stands: epochs done, the best monitored value and its
    epoch, the epochs since (which drive both the plateau schedule and early stopping), and why
    it stopped by its own rules (None: it trains on; ``--max-epochs`` is the run's limit, which a
    resumed run may raise)."""

    epoch: int = 0
    best: float = -math.inf
    best_epoch: int = -1
    stale: int = 0
    stop: str | None = None


@dataclass
class TrainState:
    """All state of a run in one value: Fabric, the members (set up by Fabric), their optimizer
    (one param group per member, holding its current learning rate), the RNG streams, each
    member's progress, the per-epoch history, the best weights (each member's from its own best
    epoch) and, with ``--average-decay``, the weights' average. ``checkpoint()`` is what a
    checkpoint holds and ``--resume`` restores."""

    fabric: Fabric
    module: ParamsModule
    optimizer: torch.optim.Optimizer
    rng: RNG
    members: tuple[Progress, ...]
    history: list[dict]
    best: dict[str, torch.Tensor]
    average: WeightAverage | None = None
    files_written: bool = False  # this run's config.json and checkpoints: before them, an earlier run's stay

    @property
    def epoch(self) -> int:
        return self.members[0].epoch

    @property
    def lrs(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def checkpoint(self) -> dict:
        return {"model": self.module, "optimizer": self.optimizer, "rng": self.rng,
                "members": [asdict(p) for p in self.members], "history": self.history, "best": self.best,
                **({"average": self.average} if self.average is not None else {})}

    @property
    def evaluated_weights(self) -> dict[str, torch.Tensor]:
        """The weights that validation and the hooks see: the average's, else the weights as trained."""
        return self.average.weights if self.average is not None else self.module.state_dict()


@contextmanager
def evaluating(state: TrainState):
    """The module holds ``state.evaluated_weights`` within, the weights as trained again after."""
    if state.average is None:
        yield
        return
    trained = {key: value.clone() for key, value in state.module.state_dict().items()}
    state.module.load_state_dict(state.average.weights)
    try:
        yield
    finally:
        state.module.load_state_dict(trained)


@dataclass(frozen=True)
class Run:
    """What a run was asked to do, fixed for its whole life: its settings (the batch size
    settled), its folder, its hooks, whether to print each epoch, and the files of an earlier run
    of the same tag and split that its first checkpoint replaces (until then, a run that fails
    leaves them as they were)."""

    config: TrainConfig
    run_dir: Path
    hooks: tuple = HOOKS
    quiet: bool = False
    replaces: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Companion:
    """A split of ``--with-splits`` as training sees it: the trials it draws batches from, and
    their size (``--batch-size``, else the split's own ``auto_batch_size``)."""

    split: str
    pool: TrainingPool
    batch_size: int


@dataclass(frozen=True)
class Decision:
    """What ``after_epoch`` decided: the new progress, whether the model improved (new best
    weights), the next epoch's learning rate, and why the model stops now (None: it goes on)."""

    progress: Progress
    improved: bool
    lr: float
    stop: str | None


def available_accelerators() -> list[str]:
    """The ``--accelerator`` values this machine can run, besides ``auto``."""
    gpus = (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if torch.backends.mps.is_available() else [])
    return ["cpu", *(["gpu"] if gpus else []), *gpus]


def create_fabric(config: TrainConfig, run_dir: Path) -> Fabric:
    """``fabric_for`` the run, TensorBoard logging into the run folder, so that ``tensorboard
    --logdir RUNS_HOME`` names each run ``{run_tag}/{split}``."""
    return fabric_for(config, TensorBoardLogger(run_dir.parent, name=run_dir.name, version="", default_hp_metric=False))


def fabric_for(config: TrainConfig, logger=None) -> Fabric:
    """Fabric for the run's accelerator, devices, strategy and precision, not launched; what this
    machine or Fabric cannot run fails in one line before any work (a search or sweep asks before
    it starts its runs)."""
    available = available_accelerators()
    if config.accelerator not in ("auto", *available):
        cuda = f"built for CUDA {torch.version.cuda} but sees no GPU" if torch.version.cuda else "a CPU-only build"
        raise UserError(f"--accelerator {config.accelerator}: not on this machine (available: auto, "
                        f"{', '.join(available)}; torch {torch.__version__} is {cuda}). For an NVIDIA GPU, install a "
                        f"CUDA build of torch into .venv, e.g. '.venv/bin/pip install torch --index-url "
                        f"https://download.pytorch.org/whl/cu128' (README: Set up)")
    on_cpu = config.accelerator == "cpu" or config.accelerator == "auto" and available == ["cpu"]
    if config.precision == "16-mixed" and on_cpu:  # Fabric would say so in a line of its own, then run bf16
        raise UserError("--precision 16-mixed needs a GPU: CPUs have no float16 autocast; use bf16-mixed or 32-true")
    if "spawn" in config.strategy or "fork" in config.strategy:
        raise UserError(f"--strategy {config.strategy}: nlbfab's loop runs in the processes Fabric starts from the "
                        f"command line (ddp, auto); spawned or forked ones would need a function to run")
    devices = int(config.devices) if config.devices.isdigit() else config.devices
    # its info line at construction ("Using bfloat16 Automatic Mixed Precision") would precede a
    # run's one error line; later ones (a DDP process that died) stay
    fabric_log = logging.getLogger("lightning_fabric")
    level = fabric_log.level
    fabric_log.setLevel(logging.WARNING)
    try:
        fabric = Fabric(accelerator=config.accelerator, devices=devices, strategy=config.strategy,
                        precision=config.precision, loggers=logger)
    except (ValueError, RuntimeError, TypeError, ImportError, MisconfigurationException) as error:
        reason = first_line(error)
        raise UserError(f"Fabric cannot run --accelerator {config.accelerator} --devices {config.devices} --strategy "
                        f"{config.strategy} --precision {config.precision}: {reason}") from None
    finally:
        fabric_log.setLevel(level)
    cores = available_cpus()
    if fabric.device.type == "cpu" and fabric.world_size > cores:  # each one a process of its own
        raise UserError(f"--devices {config.devices} on the CPU starts {fabric.world_size} training processes, more "
                        f"than the {cores} cores this process may use: use --devices {cores} or fewer")
    return fabric


def sizes_of(data: SplitData, companions: tuple[SplitData, ...] = ()) -> Sizes:
    """What a model's ``init`` needs to know of the split (and of the ``--with-splits`` splits)."""
    return Sizes(data.heldin, data.heldout, data.bins, data.fwd_steps,
                 mean_counts=data.train_recon[:, :data.bins].mean((0, 1)).cpu(),
                 companions=tuple(sizes_of(c) for c in companions))


def adamw(groups: list[dict], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) but under 16-mixed: a fused AdamW unscales the
    gradients inside its own step, after the clipping that needs them unscaled, and Fabric
    refuses to clip its gradients ("Gradient clipping is not implemented for optimizers handling
    the unscaling")."""
    fused = config.precision != "16-mixed"
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused)


def create_train_state(fabric: Fabric, config: TrainConfig, data: SplitData,
                       companions: tuple[SplitData, ...] = ()) -> TrainState:
    """Each member's parameters from the model's ``init`` (member k seeded ``seed + k``; with
    the ``companions`` of ``--with-splits``), wrapped for Fabric with ``adamw`` (a param group per
    member), fresh RNG streams, progress and, with ``--average-decay``, the weights' average."""
    model = get_model(config.model)
    fabric.seed_everything(config.seed, verbose=False)
    sizes = sizes_of(data, companions)
    module = ParamsModule(model, [model.init(sizes, config.seed + k, **config.hparams) for k in range(config.ensemble)])
    groups = [{"params": list(member.parameters())} for member in module.members]
    optimizer = adamw(groups, config)
    module, optimizer = fabric.setup(module, optimizer)
    best = {key: value.detach().clone() for key, value in module.state_dict().items()}
    decay = model.average_decay(config.average_decay)
    average = WeightAverage(decay, best) if decay else None
    return TrainState(fabric, module, optimizer, RNG(config.seed), (Progress(),) * config.ensemble, [], best, average)


def restore(state: TrainState, path: Path) -> None:
    """Load a checkpoint into ``state``: weights, optimizer (with its learning rate), RNG
    streams, progress and history."""
    saved = state.checkpoint()
    try:
        state.fabric.load(path, saved)
        members = tuple(Progress(**p) for p in saved["members"])
        if len(members) != len(state.members):
            raise KeyError(f"{len(members)} members, not {len(state.members)}")
        state.members, state.history, state.best = members, saved["history"], saved["best"]
    except (KeyError, RuntimeError, EOFError, TypeError, pickle.UnpicklingError) as error:
        reason = first_line(error)
        if reason.startswith("Error(s) in loading state_dict"):  # its next line names the entry that does not fit
            detail = str(error).splitlines()[1].strip()
            raise UserError(f"cannot resume from {path}: its weights are from another model or sizes than this run's "
                            f"({detail[:200]}{'...' if len(detail) > 200 else ''}): resume with the run's own --model, "
                            f"--ensemble, --with-splits and sizes (those of its config.json, which --resume takes "
                            f"when they are not given), or drop --resume to start afresh") from None
        raise UserError(f"cannot resume from {path}: it is damaged or from another model or nlbfab version "
                        f"({reason}); drop --resume to start afresh") from None


def training_members(state: TrainState) -> list[int] | None:
    """The members a step computes: those still training (a stopped one keeps its weights), or
    all of them under DDP, which expects a gradient for every parameter."""
    if state.fabric.world_size > 1:
        return None
    return [k for k, p in enumerate(state.members) if not p.stop]


def train_step(state: TrainState, batch: tuple[torch.Tensor, torch.Tensor], config: TrainConfig, companions=()):
    """One optimizer step of the training members on ``batch = (heldin, target)`` (and a batch
    of each ``--with-splits`` split, ``companions``); returns their summed loss and the model's
    loss terms. Each member's gradient is clipped to its own norm. A non-finite loss or gradient
    stops the run before the update, except a gradient overflow under 16-mixed, which the
    gradient scaler skips and answers with a lower scale."""
    heldin, target = batch
    loss, terms = state.module(heldin, target.shape[1] - heldin.shape[1], dropout=config.dropout, target=target,
                               epoch=state.epoch, members=training_members(state), companions=companions)
    state.optimizer.zero_grad(set_to_none=True)
    state.fabric.backward(loss)
    # unscales the gradients (16-mixed) and measures all of them; the norm of the synchronised
    # gradients is the same on every rank, so all ranks stop together
    norm = state.fabric.clip_gradients(state.module, state.optimizer, max_norm=math.inf, error_if_nonfinite=False)
    if config.grad_clip:
        for group in state.optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], config.grad_clip)
    overflow_is_routine = config.precision == "16-mixed" and torch.isfinite(loss)
    if not torch.isfinite(norm) and not overflow_is_routine:
        what = f"training loss became {float(loss)}" if not torch.isfinite(loss) else "gradients became non-finite"
        raise NonFiniteLoss(f"{what} at epoch {state.epoch}: stopped before the update")
    state.optimizer.step()
    if state.average is not None:
        state.average.update(state.module.state_dict())
    return loss.detach(), terms


def train_epoch(state: TrainState, pool: TrainingPool, run: Run,
                companions: tuple[Companion, ...] = ()) -> tuple[float, dict[str, float]]:
    """One pass over the pool's trials (the train trials, and with ``--train-eval-heldin`` the eval
    trials) in seeded random batches; each rank takes its share of every global batch. With
    ``--with-splits`` every step also takes a batch of each of their ``companions``
    (``companion_batches``). Returns the mean training loss over ranks and members (summed over
    the splits), and the mean of each of the model's loss terms (on rank 0)."""
    fabric = state.fabric
    state.module.train()
    batches = batch_indices(pool.heldin.shape[0], run.config.batch_size, state.rng.batches)
    feeds = [(pool, batches), *((c.pool, companion_batches(c, len(batches), state.rng.batches)) for c in companions)]
    total, term_totals = torch.zeros((), device=fabric.device), {}
    # a bar within each epoch, on a terminal only (None: tqdm turns itself off when piped)
    hide = True if run.quiet or not fabric.is_global_zero else None
    for step in tqdm(range(len(batches)), leave=False, disable=hide, unit="batch", desc="epoch"):
        shards = [(p, b[step][fabric.global_rank::fabric.world_size].to(fabric.device)) for p, b in feeds]
        own, *extra = [(p.heldin[index], p.target[index]) for p, index in shards]
        loss, terms = train_step(state, own, run.config, extra)
        total += loss
        for name, value in terms.items():
            term_totals[name] = term_totals.get(name, 0) + value
    terms = {name: float(value) / len(batches) for name, value in term_totals.items()}
    mean = total / (len(batches) * len(training_members(state) or state.members))
    return float(fabric.all_reduce(mean, reduce_op="mean")), terms


def companion_batches(companion: Companion, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A companion's batches for an epoch of ``steps`` steps: an epoch is a pass over the run's
    own split, whatever the companions' sizes (the stopping rule counts its epochs, and mc_maze's
    pool would otherwise make an epoch of mc_maze_small's six times longer), so each takes the
    first ``steps`` batches of fresh seeded passes over its pool, as many as that needs."""
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        batches += batch_indices(companion.pool.heldin.shape[0], companion.batch_size, generator)
    return batches[:steps]


@torch.no_grad()
def eval_logrates(module, data: SplitData, members=None) -> torch.Tensor:
    """The members' log-rates on the eval trials, ``(members, trials, bins + fwd, neurons)``."""
    module.eval()
    chunks = data.eval_heldin.split(inference_batch(data.eval_heldin.device))
    return torch.cat([module(chunk, data.fwd_steps, members=members)[0] for chunk in chunks], 1).float()


def loss_and_value(data: SplitData, logrates: torch.Tensor) -> tuple[float, float]:
    """(validation loss, monitored value) of one model's eval ``logrates``. The loss covers the
    eval trials' neurons and forward bins on the val phase, their held-in observed bins on the
    test phase (those of them ``eval_recon`` knows: with ``--train-eval-heldin``, the ones kept
    out of training). The monitored value, higher is better, is the val co-bps, or on the test phase
    minus the loss."""
    if data.split.phase == "test":
        loss = float(poisson_nll(logrates[:, :data.bins, :data.heldin], data.eval_recon))
        return loss, -loss
    loss = float(poisson_nll(logrates, data.eval_recon))
    return loss, co_bps(data, logrates[:, :data.bins, data.heldin:].exp().cpu().numpy())


def validate(module, data: SplitData) -> tuple[list[tuple[float, float]], tuple[float, float]]:
    """``loss_and_value`` of each member, and of the mean of all members' rates."""
    logrates = eval_logrates(module, data)
    return [loss_and_value(data, member) for member in logrates], loss_and_value(data, mean_logrates(logrates))


def plateau_lr(lr: float, stale: int, config: TrainConfig) -> float:
    """The learning rate for the next epoch: multiplied by ``lr_decay`` each time the monitored
    value has gone another ``lr_patience`` epochs without improving (``lr_decay`` 1: constant).
    At a constant lr the val co-bps keeps jumping around its plateau; smaller steps let the model
    settle there before the run stops. Counted from the same ``stale`` as early stopping, so the
    schedule needs no state of its own beyond the optimizer's lr and is the same on every rank."""
    return lr * config.lr_decay if stale and stale % config.lr_patience == 0 else lr


def after_epoch(progress: Progress, value: float, lr: float, config: TrainConfig) -> Decision:
    """The epoch's decisions from its monitored ``value`` (higher is better) and learning rate:
    a new best or one more stale epoch; the plateau schedule (``plateau_lr``); and the stop,
    after ``patience`` stale epochs, at a plateau whose decay would go below ``min_lr`` (what is
    left are gains too small to wait for), or at ``max_epochs``."""
    epoch = progress.epoch
    improved = value > progress.best
    if improved:
        progress = replace(progress, epoch=epoch + 1, best=value, best_epoch=epoch, stale=0)
    else:
        progress = replace(progress, epoch=epoch + 1, stale=progress.stale + 1)
    next_lr = plateau_lr(lr, progress.stale, config)
    stop = None
    if progress.stale >= config.patience:
        stop = f"no improvement for {config.patience} epochs"
    elif next_lr < lr and next_lr < config.min_lr:
        stop = f"no improvement for {config.lr_patience} epochs at the lowest learning rate ({lr:.3g})"
    progress = replace(progress, stop=stop)
    return Decision(progress, improved, next_lr, stop or max_epochs_stop(progress, config))


def max_epochs_stop(progress: Progress, config: TrainConfig) -> str | None:
    return "max epochs" if progress.epoch >= config.max_epochs else None


def member_decision(progress: Progress, value: float, lr: float, config: TrainConfig) -> Decision:
    """``after_epoch`` for a member that trains on; one that has stopped stays as it stopped,
    its learning rate 0 (AdamW then leaves its weights as they are) while the others train."""
    if progress.stop:
        return Decision(replace(progress, epoch=progress.epoch + 1), False, 0.0, progress.stop)
    return after_epoch(progress, value, lr, config)


def run_stop(members: tuple[Progress, ...], config: TrainConfig) -> str | None:
    """Why the run stops: when every member has stopped (by its own rules or at ``max_epochs``),
    a single model's reason, or how many members stopped for each reason."""
    reasons = [p.stop or max_epochs_stop(p, config) for p in members]
    if not all(reasons):
        return None
    if len(members) == 1:
        return reasons[0]
    return f"all {len(members)} members stopped (" + "; ".join(
        f"{reasons.count(r)}: {r}" for r in dict.fromkeys(reasons)) + ")"


def keep_best(best: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], improved: list[int]) -> dict:
    """``best`` with the ``improved`` members' entries replaced by copies of ``weights``
    (state dicts of ``ParamsModule``, whose keys start ``members.{k}.``)."""
    return best | {key: value.detach().clone() for key, value in weights.items()
                   if int(key.split(".")[1]) in improved}


def ensemble_forward(module, fwd_steps: int, members: list[int], submission: bool = False):
    """``predict``'s forward for the mean rates of ``members``, with the first one's latents; with
    ``submission``, as the submission takes them (the model's ``submission_apply_members``)."""
    def forward(heldin):
        logrates, latents = module(heldin, fwd_steps, members=members, submission=submission)
        return mean_logrates(logrates), latents[0]
    return forward


def first_member_inputs(module, fwd_steps: int, members: list[int]):
    """``predict``'s ``inputs``: the first of ``members``' inferred inputs (an ensemble's members
    each infer their own, in their own coordinates, as with the latents); None where the model
    infers none."""
    if module.model.inferred_inputs is None:
        return None
    return lambda heldin: module(heldin, fwd_steps, members=members[:1], inputs=True)[0]


def run_hooks(state: TrainState, data: SplitData, hooks, epoch: int, members: list[int],
              submission: bool = False) -> tuple[dict, dict]:
    """Predict all trials with the mean of ``members`` in eval mode (with ``submission``, as the
    submission takes them) and run every hook (on rank 0); returns (metrics, predictions)."""
    state.module.eval()
    predictions = predict(ensemble_forward(state.module, data.fwd_steps, members, submission), data,
                          first_member_inputs(state.module, data.fwd_steps, members))
    scores = {}
    if state.fabric.is_global_zero:
        for hook in hooks:
            scores |= hook(state.fabric.logger, data, predictions, epoch) or {}
    return scores, predictions


def _save_atomic(fabric: Fabric, path: Path, state: dict) -> None:
    partial = layout.partial(path)
    fabric.save(partial, state)
    if fabric.is_global_zero:
        os.replace(partial, path)
    fabric.barrier()


def checkpoint_due(epoch: int, since_write: float, config: TrainConfig, stopping: bool) -> bool:
    """Whether the checkpoints are written after ``epoch``: after the first (a run can resume
    as soon as it has one), when ``checkpoint_every`` seconds have passed since the last write,
    and when the run stops. A resumed run redoes the epochs since, drawing what it drew before."""
    return epoch == 0 or stopping or since_write >= config.checkpoint_every


def start_writing(state: TrainState, run: Run) -> None:
    """What a run writes before its first checkpoint: an earlier run's files of the same tag and
    split go (``run.replaces``) and the run's ``config.json`` takes their place, on rank 0."""
    if state.fabric.is_global_zero:
        for old in run.replaces:
            old.unlink(missing_ok=True)
        layout.write_json(layout.config_file(run.run_dir), asdict(run.config))
    state.fabric.barrier()
    state.files_written = True


def save_checkpoints(state: TrainState, run: Run, improved: bool) -> None:
    """``last`` and, when a member improved since the previous write, ``best`` (the best weights
    and the members' progress), both written atomically; the first write of a new run first
    replaces an earlier run's files and writes the run's ``config.json``."""
    if not state.files_written:
        start_writing(state, run)
    _save_atomic(state.fabric, layout.checkpoint(run.run_dir, "last"), state.checkpoint())
    if improved:
        _save_atomic(state.fabric, layout.checkpoint(run.run_dir, "best"),
                     {"model": state.best, "members": [asdict(p) for p in state.members]})


def write_progress(state: TrainState, run: Run) -> None:
    """The progress that ``nlbfab-all``'s live table reads (an ensemble's: its best member's)."""
    if state.fabric.is_global_zero:
        p = max(state.members, key=lambda member: member.best)
        layout.write_progress(run.run_dir, state.epoch - 1, p.best, p.best_epoch, run.config.max_epochs,
                              str(state.fabric.device))


def print_epoch(state: TrainState, data: SplitData, seconds: float) -> None:
    """One line an epoch: the losses, and the monitored value with the best so far. The test
    phase monitors its val loss itself (its negative, so that higher is better): the line shows
    the loss, lower is better, rather than a negative one."""
    record = state.history[-1]
    line = f"epoch {record['epoch']:4d}  train {record['train_loss']:.5f}  val {record['val_loss']:.5f}  "
    scored = data.split.phase == "val"
    sign = 1 if scored else -1  # the test phase's monitored value is minus its val loss
    if len(state.members) == 1:
        p = state.members[0]
        line += (f"val co-bps {record['monitored']:.4f}  " if scored else "") + f"best {sign * p.best:.4f} @ {p.best_epoch}"
    else:
        bests = sorted(sign * p.best for p in state.members)
        training = sum(not p.stop for p in state.members)
        line += ((f"val co-bps {record['monitored']:.4f} (mean of {len(bests)})  " if scored else f"(mean of {len(bests)})  ")
                 + f"members' best {bests[0]:.4f}..{bests[-1]:.4f}  {training} training")
    state.fabric.print(f"{line}  {seconds:6.1f} s")


def training_pool(data: SplitData, config: TrainConfig, homes: Homes) -> tuple[SplitData, TrainingPool]:
    """The trials a split's training draws its batches from: its train trials, with
    ``--train-eval-heldin`` its eval trials' held-in spikes (``data`` then keeps only what the
    monitor may score), with ``--train-test-heldin`` on the val phase its dataset's test trials'
    (on the test phase those are the eval trials: ``--train-eval-heldin`` decides)."""
    data, pool = with_eval_heldin(data, config.seed) if config.train_eval_heldin else (data, train_trials_only(data))
    if config.train_test_heldin and data.split.phase == "val":
        pool = with_test_heldin(pool, load_test_heldin(data, homes))
    return data, pool


def set_up(config: TrainConfig, homes: Homes, hooks, resume: bool,
           quiet: bool) -> tuple[TrainState, SplitData, TrainingPool, Run, tuple[Companion, ...]]:
    """Fabric, the split on its device, the trials training draws from (and those of the
    ``--with-splits`` splits), the run folder and the train state (from the last checkpoint
    with ``resume``; else a new run replacing an old one's files); the process's heap set to
    reuse big buffers (``nlbfab.memory``)."""
    split = get_split(config.split)
    companion_names = companion_splits(config)
    # a wrong name or value fails before Fabric starts
    get_model(config.model).settle(config.hparams, with_splits=bool(companion_names))
    if companion_names and not get_model(config.model).shares_across_splits:
        raise UserError(f"--with-splits: model {config.model} cannot share its dynamics across splits (lfads can)")
    keep_freed_buffers()
    run_dir = homes.run_dir(config.run_tag, split)
    fabric = create_fabric(config, run_dir)
    fabric.launch()
    last = layout.checkpoint(run_dir, "last")
    if resume and not last.is_file():
        raise UserError(f"nothing to resume: no {last}; drop --resume to start afresh")
    data = load_split(split, homes).to(fabric.device)
    others = tuple(load_split(name, homes).to(fabric.device) for name in companion_names)
    # every setting the run uses is in its config.json: the batch size, the weights' average, the
    # eval trials' training and the model's hyperparameters settled
    model = get_model(config.model)
    given_batch = config.batch_size
    config = replace(with_batch_size(config, data.train_heldin.shape[0]),
                     average_decay=model.average_decay(config.average_decay),
                     train_eval_heldin=model.train_eval_heldin(config.train_eval_heldin),
                     hparams=model.settle(config.hparams, split.dataset.name, with_splits=bool(companion_names)))
    data, pool = training_pool(data, config, homes)
    companions = tuple(Companion(other.split.name, training_pool(other, config, homes)[1],
                                 given_batch or auto_batch_size(other.train_heldin.shape[0]))
                       for other in others)
    run = Run(config, run_dir, tuple(hooks), quiet, () if resume else tuple(layout.old_run_files(run_dir)))
    state = create_train_state(fabric, run.config, data, others)  # a model's own checks (--ci-lag) before any folder
    if fabric.is_global_zero:
        last.parent.mkdir(parents=True, exist_ok=True)
    fabric.barrier()
    if companions and not quiet:
        fabric.print("also training on " + ", ".join(f"{c.split} ({c.pool.heldin.shape[0]} trials, batches of "
                                                     f"{c.batch_size})" for c in companions))
    if resume:
        restore(state, last)  # settings the checkpoint cannot take fail here, config.json untouched
        start_writing(state, run)
        p = max(state.members, key=lambda member: member.best)
        fabric.print(f"resuming {split.name} at epoch {state.epoch} (best {p.best:.4f} at {p.best_epoch}, "
                     f"lr {max(state.lrs):.3g})")
    return state, data, pool, run, companions


def train(config: TrainConfig, homes: Homes, hooks=HOOKS, resume: bool = False, quiet: bool = False,
          on_epoch=None) -> dict:
    """Train ``config.model`` on ``config.split``; write checkpoints, TensorBoard logs, metrics
    and the submission under the run's folder. Returns the run's summary. ``on_epoch(record)``,
    where given, gets each epoch's record (epoch, losses, monitored value, lr) on rank 0 once its
    checkpoint is written: a hyperparameter search reports it to its scheduler."""
    with memory_errors_as_user_errors(config):
        return run_training(config, homes, hooks, resume, quiet, on_epoch)


@contextmanager
def memory_errors_as_user_errors(config: TrainConfig):
    """A model or batch too large for the machine's memory is a setting to change: one line."""
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not isinstance(error, torch.OutOfMemoryError) \
                and "can't allocate memory" not in str(error):
            raise
        raise UserError(f"out of memory training {config.split} (--model {config.model}, --batch-size "
                        f"{config.batch_size or 'auto'}, --ensemble {config.ensemble}, the model's sizes "
                        f"{config.hparams or 'its defaults'}): choose smaller ones") from None


def run_training(config: TrainConfig, homes: Homes, hooks, resume: bool, quiet: bool, on_epoch) -> dict:
    """``train``'s loop, from the set-up to the finished run's summary."""
    state, data, pool, run, companions = set_up(config, homes, hooks, resume, quiet)
    started = time.perf_counter()
    everyone = list(range(len(state.members)))
    stop = run_stop(state.members, run.config)
    written, unwritten_best = time.perf_counter(), False
    while stop is None:
        epoch, lrs = state.epoch, state.lrs
        try:
            train_loss, terms = train_epoch(state, pool, run, companions)
        except NonFiniteLoss as error:
            kept = "the best checkpoint is kept" if state.files_written else \
                "nothing of this run was written (an earlier run's files are as they were)"
            raise NonFiniteLoss(f"{error}, {kept}. Try a lower --learning-rate or --grad-clip") from None
        with evaluating(state):
            members, (val_loss, value) = validate(state.module, data)
        decisions = [member_decision(p, v, lr, run.config) for p, (_, v), lr in zip(state.members, members, lrs)]
        state.members = tuple(d.progress for d in decisions)
        stop = run_stop(state.members, run.config)
        for group, decision in zip(state.optimizer.param_groups, decisions):  # the checkpoint holds each lr
            group["lr"] = decision.lr
        improved = [k for k, d in enumerate(decisions) if d.improved]
        state.best = keep_best(state.best, state.evaluated_weights, improved)
        record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "monitored": value, "lr": lrs[0]}
        scalars = {"loss/train": train_loss, "loss/val": val_loss, "monitored": value, "lr": lrs[0],
                   **{f"loss/{name}": term for name, term in terms.items()}}
        if len(members) > 1:
            record["members"] = [{"val_loss": loss, "monitored": v, "lr": lr} for (loss, v), lr in zip(members, lrs)]
            scalars |= {f"monitored/member_{k}": v for k, (_, v) in enumerate(members)}
        state.history.append(record)
        state.fabric.log_dict(scalars, step=epoch)
        unwritten_best |= bool(improved)
        # rank 0's clock decides for every rank: each write ends at a barrier
        if state.fabric.broadcast(checkpoint_due(epoch, time.perf_counter() - written, run.config, stop is not None)):
            save_checkpoints(state, run, unwritten_best)
            written, unwritten_best = time.perf_counter(), False
        write_progress(state, run)
        if on_epoch and state.fabric.is_global_zero:
            on_epoch(record)
        if not run.quiet:
            print_epoch(state, data, time.perf_counter() - started)
        if (epoch + 1) % run.config.log_every_n_epochs == 0:
            with evaluating(state):
                scores, _ = run_hooks(state, data, run.hooks, epoch, everyone)
            if scores and not run.quiet:
                state.fabric.print(f"epoch {epoch:4d}  nlb: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return finish(state, data, run, homes, stop, time.perf_counter() - started)


def log_final_metrics(logger, config: TrainConfig, summary: dict, phase: str) -> None:
    """The run's settings with its final scores, for TensorBoard's HPARAMS tab to compare runs:
    the submission's NLB metrics where it was scored, the best held-in validation loss on the test
    phase, and the best epoch."""
    final = {f"final/{name}": value for name, value in summary.get("metrics", {}).items()}
    if phase == "test":
        final["final/val loss"] = -summary["best_monitored"]
    final["final/best epoch"] = summary["best_epoch"]
    logger.log_hyperparams(asdict(config), metrics=final)


def choose_members(state: TrainState, data: SplitData, run: Run, homes: Homes) -> list[int]:
    """The members whose mean rates go into the submission: all of them, or ``--ensemble-top``
    chosen greedily by their val co-bps (``nlbfab.ensemble``); on the test phase the val run's
    choice, or all members where there is none."""
    count, top = len(state.members), run.config.ensemble_top
    if top is None or count == 1:
        return list(range(count))
    if data.split.phase == "val":
        rates = [eval_logrates(state.module, data, [k])[0, :, :data.bins, data.heldin:].exp().cpu().numpy()
                 for k in range(count)]
        return greedy_selection(rates, lambda mean: co_bps(data, mean), top)
    chosen = val_choice(homes, run.config.run_tag, data.split, count)
    if chosen is None:
        state.fabric.print(f"no val run of {count} members under run tag {run.config.run_tag} to take the choice of "
                           f"--ensemble-top {top} from: the submission holds the mean of all members")
        return list(range(count))
    state.fabric.print(f"members {chosen}: chosen by the val run")
    return chosen


def member_table(state: TrainState, data: SplitData, run: Run, chosen: list[int]) -> list[dict]:
    """Each member's seed, best epoch and monitored value, why it stopped, whether it is in the
    submission and, on the val phase, its NLB metrics (``nlbfab.evaluation.metrics``) from one
    plain pass, as validation sees it."""
    rows = []
    for k, p in enumerate(state.members):
        row = {"member": k, "seed": run.config.seed + k, "best_epoch": p.best_epoch, "best_monitored": p.best,
               "stop_reason": p.stop or max_epochs_stop(p, run.config), "chosen": k in chosen}
        if data.split.phase == "val":
            rates = predict(ensemble_forward(state.module, data.fwd_steps, [k]), data)  # on every rank, as DDP needs
            row["metrics"] = metrics(data, rates) if state.fabric.is_global_zero else {}
        rows.append(row)
    return rows


def finish(state: TrainState, data: SplitData, run: Run, homes: Homes, stop_reason: str, seconds: float) -> dict:
    """Load the best weights, choose the members whose mean is submitted, run the hooks on that
    mean, merge its rates into the run's submission file and score that file as EvalAI would: on
    the val phase, and on a synthetic dataset's test phase (``local_target``). An ensemble's
    summary lists its members."""
    state.module.load_state_dict(state.best)
    chosen = choose_members(state, data, run, homes)
    best_epoch = max(state.members[k].best_epoch for k in chosen)
    # the submitted model's figures and metrics one step past the last epoch's: at its best epoch's
    # step they would double back on TensorBoard's curves
    scores, predictions = run_hooks(state, data, run.hooks, state.epoch, chosen, submission=True)
    if run.config.save_latents:  # the first chosen member's, as the hooks show; every rank predicts, as DDP needs
        arrays = predict_latents(ensemble_forward(state.module, data.fwd_steps, chosen[:1]),
                                 first_member_inputs(state.module, data.fwd_steps, chosen), data)
        if state.fabric.is_global_zero:
            write_latents(run.run_dir, arrays, split=data.split.name, model=run.config.model,
                          seed=run.config.seed + chosen[0])
    _, monitored = loss_and_value(data, mean_logrates(eval_logrates(state.module, data, chosen)))
    summary = {"split": data.split.name, "model": run.config.model, "epochs": state.epoch, "best_epoch": best_epoch,
               "best_monitored": monitored, "stop_reason": stop_reason, "seconds": round(seconds, 2),
               "hook_metrics": scores, "run_dir": str(run.run_dir)}
    if len(state.members) > 1:
        summary["ensemble"] = {"members": member_table(state, data, run, chosen), "chosen": chosen}
    if state.fabric.is_global_zero:
        expected = shapes(data.train_heldin.shape[0], data.eval_heldin.shape[0], data.bins, data.fwd_steps,
                          data.heldin, data.heldout)
        target = ({data.split.group: data.target} if data.split.phase == "val"
                  else local_target(homes, data.split, state.fabric.print))
        summary |= submit_and_score(data.split, predictions, run.run_dir.parent, expected, target)
        log_final_metrics(state.fabric.logger, run.config, summary, data.split.phase)
        state.fabric.logger.finalize("success")  # its writer thread done: the event file is complete on return
        layout.write_json(layout.metrics_file(run.run_dir), summary)
    state.fabric.barrier()
    return summary
