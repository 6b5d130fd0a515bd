"""The hand-written Fabric training loop.

One entry point, ``train(config, ...)``: set-up (Fabric, data, parameters, optimizer, all state
in one dict), then a loop whose sections run in order: train an epoch, validate, lower the
learning rate on a plateau, checkpoint, early-stop, hooks. At the end the best checkpoint
predicts the rates that go into the run's ``submission-{phase}.h5``.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from lightning_fabric import Fabric
from lightning_fabric.loggers import TensorBoardLogger
from lightning_fabric.utilities.exceptions import MisconfigurationException
from tqdm import tqdm

from nlbfab.data import SplitData, batch_indices, load_split
from nlbfab.errors import UserError
from nlbfab.evaluation import co_bps, inference_batch, predict
from nlbfab.hooks import HOOKS
from nlbfab.loss import poisson_nll
from nlbfab.models import Sizes, get_model
from nlbfab.scoring import score
from nlbfab.splits import get_split
from nlbfab.submission import submit
from nlbfab.train_config import TrainConfig, with_batch_size


class NonFiniteLoss(UserError):
    """The loss or the gradients became NaN or infinite: the run stops before the update."""


class ParamsModule(torch.nn.Module):
    """The thin object layer Fabric needs: holds a model's parameter dict so that ``setup`` can
    wrap it (DDP synchronises gradients through the module's forward), and calls the pure
    ``apply`` with them."""

    def __init__(self, apply, params: dict[str, torch.Tensor]):
        super().__init__()
        self.apply_fn = apply
        self.params = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in params.items()})

    def forward(self, heldin, fwd_steps: int, dropout: float = 0.0):
        return self.apply_fn(dict(self.params), heldin, fwd_steps, dropout=dropout, training=self.training)


def _save_atomic(fabric: Fabric, path: Path, state: dict) -> None:
    partial = path.with_name(f".{path.name}.partial")
    fabric.save(partial, state)
    if fabric.is_global_zero:
        os.replace(partial, path)
    fabric.barrier()


def _capture_rng(state: dict, batch_rng: torch.Generator) -> None:
    state["batch_rng"] = batch_rng.get_state()
    state["torch_rng"] = torch.get_rng_state()
    state["cuda_rng"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def _restore_rng(state: dict, batch_rng: torch.Generator) -> None:
    batch_rng.set_state(state["batch_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def train_epoch(fabric, module, optimizer, data: SplitData, config: TrainConfig, batch_rng, quiet: bool,
                epoch: int, checkpoints: Path) -> float:
    """One pass over the train trials in seeded random batches; each rank takes its share of
    every global batch. Returns the mean training loss over ranks."""
    module.train()
    batches = batch_indices(data.train_heldin.shape[0], config.batch_size, batch_rng)
    total = torch.zeros((), device=fabric.device)
    # a bar within each epoch, on a terminal only (None: tqdm turns itself off when piped)
    hide = True if quiet or not fabric.is_global_zero else None
    for index in tqdm(batches, leave=False, disable=hide, unit="batch", desc="epoch"):
        shard = index[fabric.global_rank::fabric.world_size].to(fabric.device)
        logrates, _ = module(data.train_heldin[shard], data.fwd_steps, dropout=config.dropout)
        loss = poisson_nll(logrates, data.train_recon[shard])
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        # the norm of the synchronised gradients is the same on every rank, so all ranks stop together
        norm = fabric.clip_gradients(module, optimizer, max_norm=config.grad_clip or math.inf, error_if_nonfinite=False)
        # under 16-mixed an overflowing gradient is routine: the gradient scaler skips that step
        # and lowers its scale, so only a non-finite loss stops the run there
        overflow_is_routine = config.precision == "16-mixed" and torch.isfinite(loss)
        if not torch.isfinite(norm) and not overflow_is_routine:
            what = f"training loss became {float(loss)}" if not torch.isfinite(loss) else "gradients became non-finite"
            raise NonFiniteLoss(f"{what} at epoch {epoch}: stopped before the update; the best checkpoint "
                                f"({checkpoints / 'best.ckpt'}) is kept. Try a lower --learning-rate or --grad-clip")
        optimizer.step()
        total += loss.detach()
    return float(fabric.all_reduce(total / len(batches), reduce_op="mean"))


def plateau_lr(lr: float, stale: int, config: TrainConfig) -> float:
    """The learning rate for the next epoch: multiplied by ``lr_decay`` each time the monitored
    value has gone another ``lr_patience`` epochs without improving (``lr_decay`` 1: constant).
    At a constant lr the val co-bps keeps jumping around its plateau; smaller steps let the model
    settle there before the run stops. Counted from the same ``stale`` as early stopping, so the
    schedule needs no state of its own beyond the optimizer's lr and is the same on every rank."""
    return lr * config.lr_decay if stale and stale % config.lr_patience == 0 else lr


@torch.no_grad()
def validate(module, data: SplitData) -> tuple[float, float]:
    """(validation loss, monitored value). The loss covers the eval trials' neurons and forward
    bins on the val phase, their held-in observed bins on the test phase. The monitored value,
    higher is better, is the val co-bps, or on the test phase minus the loss."""
    module.eval()
    chunks = data.eval_heldin.split(inference_batch(data.eval_heldin.device))
    logrates = torch.cat([module(chunk, data.fwd_steps)[0] for chunk in chunks]).float()
    if data.split.phase == "test":
        loss = float(poisson_nll(logrates[:, :data.bins, :data.heldin], data.eval_recon))
        return loss, -loss
    loss = float(poisson_nll(logrates, data.eval_recon))
    return loss, co_bps(data, logrates[:, :data.bins, data.heldin:].exp().cpu().numpy())


def run_hooks(fabric, module, data: SplitData, epoch: int) -> tuple[dict, dict]:
    """Predict all trials in eval mode and run every hook (on rank 0); returns (metrics, predictions)."""
    module.eval()
    predictions = predict(lambda heldin: module(heldin, data.fwd_steps), data)
    scores = {}
    if fabric.is_global_zero:
        for hook in HOOKS:
            scores |= hook(fabric.logger, data, predictions, epoch) or {}
    return scores, predictions


def write_progress(run_dir: Path, **fields) -> None:
    """``progress.json``: where a run is, read by ``nlbfab-all``'s live table."""
    partial = run_dir / ".progress.json.partial"
    partial.write_text(json.dumps(fields))
    os.replace(partial, run_dir / "progress.json")


def create_train_state(fabric: Fabric, config: TrainConfig, data: SplitData):
    """All state in one place, what a checkpoint holds and ``--resume`` restores: the model
    (set up by Fabric), its optimizer (whose state holds the current learning rate), epoch and
    early-stopping counters, and the RNG states.
    Returns ``(module, optimizer, state, batch_rng)``."""
    model = get_model(config.model)
    fabric.seed_everything(config.seed, verbose=False)
    sizes = Sizes(data.heldin, data.heldout, data.bins, data.fwd_steps,
                  mean_counts=data.train_recon[:, :data.bins].mean((0, 1)).cpu())
    params = model.init(sizes, config.seed, **{k: getattr(config, k) for k in model.hparams})
    module = ParamsModule(model.apply, params)
    # fused: one kernel for all parameters (0.13 ms a step on a CPU against 0.58 ms for the default)
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  fused=True)
    module, optimizer = fabric.setup(module, optimizer)
    batch_rng = torch.Generator().manual_seed(config.seed)
    state = {"model": module, "optimizer": optimizer, "epoch": 0, "best": -math.inf, "best_epoch": -1,
             "stale": 0, "history": []}
    _capture_rng(state, batch_rng)
    return module, optimizer, state, batch_rng


def available_accelerators() -> list[str]:
    """The ``--accelerator`` values this machine can run, besides ``auto``."""
    gpus = (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if torch.backends.mps.is_available() else [])
    return ["cpu", *(["gpu"] if gpus else []), *gpus]


def create_fabric(config: TrainConfig, run_dir: Path) -> Fabric:
    """Fabric for the run's accelerator, devices, strategy and precision; what this machine or
    Fabric cannot run fails in one line before any work. TensorBoard logs into the run folder,
    so that ``tensorboard --logdir RUNS_HOME`` names each run ``{run_tag}/{split}``."""
    available = available_accelerators()
    if config.accelerator not in ("auto", *available):
        cuda = f"built for CUDA {torch.version.cuda} but sees no GPU" if torch.version.cuda else "a CPU-only build"
        raise UserError(f"--accelerator {config.accelerator}: not on this machine (available: auto, "
                        f"{', '.join(available)}; torch {torch.__version__} is {cuda}). For an NVIDIA GPU, install a "
                        f"CUDA build of torch into .venv, e.g. '.venv/bin/pip install torch --index-url "
                        f"https://download.pytorch.org/whl/cu128' (README: Set up)")
    devices = int(config.devices) if config.devices.isdigit() else config.devices
    logger = TensorBoardLogger(run_dir.parent, name=run_dir.name, version="", default_hp_metric=False)
    try:
        fabric = Fabric(accelerator=config.accelerator, devices=devices, strategy=config.strategy,
                        precision=config.precision, loggers=logger)
    except (ValueError, RuntimeError, TypeError, MisconfigurationException) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"Fabric cannot run --accelerator {config.accelerator} --devices {config.devices} --strategy "
                        f"{config.strategy} --precision {config.precision}: {reason}") from None
    if config.precision == "16-mixed" and fabric.device.type == "cpu":  # Fabric would run bf16 and say 16-mixed
        raise UserError("--precision 16-mixed needs a GPU: CPUs have no float16 autocast; use bf16-mixed or 32-true")
    return fabric


def clear_old_run(run_dir: Path) -> None:
    """A new run with the same tag and split replaces the old one: its logs, checkpoints and
    scores go, so that nothing of it can pass for the new run's."""
    stale = [*run_dir.glob("events.out.tfevents.*"), run_dir / "hparams.yaml", run_dir / "metrics.json",
             run_dir / "checkpoints" / "best.ckpt", run_dir / "checkpoints" / "last.ckpt"]
    for path in stale:
        path.unlink(missing_ok=True)


def train(config: TrainConfig, prep_home: Path, runs_home: Path, file_names: dict[str, str],
          resume: bool = False, quiet: bool = False) -> dict:
    """Train ``config.model`` on ``config.split``; write checkpoints, TensorBoard logs, metrics
    and the submission under ``runs_home/run_tag/split``. Returns the run's summary."""
    split = get_split(config.split)
    get_model(config.model)  # fail on a wrong name before starting Fabric
    run_dir = Path(runs_home) / config.run_tag / split.name
    checkpoints = run_dir / "checkpoints"
    fabric = create_fabric(config, run_dir)
    fabric.launch()
    if resume and not (checkpoints / "last.ckpt").is_file():
        raise UserError(f"nothing to resume: no {checkpoints / 'last.ckpt'}; drop --resume to start afresh")
    data = load_split(split, prep_home, file_names).to(fabric.device)
    config = with_batch_size(config, data.train_heldin.shape[0])
    if fabric.is_global_zero:
        if not resume:
            clear_old_run(run_dir)
        checkpoints.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=1))
    fabric.barrier()

    module, optimizer, state, batch_rng = create_train_state(fabric, config, data)
    if resume:
        fabric.load(checkpoints / "last.ckpt", state)
        _restore_rng(state, batch_rng)
        fabric.print(f"resuming {split.name} at epoch {state['epoch']} (best {state['best']:.4f} at {state['best_epoch']}, "
                     f"lr {optimizer.param_groups[0]['lr']:.3g})")

    started = time.perf_counter()
    stop_reason = "max epochs"
    while state["epoch"] < config.max_epochs:
        epoch = state["epoch"]
        train_loss = train_epoch(fabric, module, optimizer, data, config, batch_rng, quiet, epoch, checkpoints)
        val_loss, value = validate(module, data)
        state["epoch"] = epoch + 1
        improved = value > state["best"]
        if improved:
            state.update(best=value, best_epoch=epoch, stale=0)
        else:
            state["stale"] += 1
        lr = optimizer.param_groups[0]["lr"]
        next_lr = plateau_lr(lr, state["stale"], config)
        for group in optimizer.param_groups:  # the optimizer's checkpoint holds the lr, so resume continues it
            group["lr"] = next_lr
        state["history"].append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "monitored": value,
                                 "lr": lr})
        fabric.log_dict({"loss/train": train_loss, "loss/val": val_loss, "monitored": value, "lr": lr}, step=epoch)
        _capture_rng(state, batch_rng)
        _save_atomic(fabric, checkpoints / "last.ckpt", state)
        if fabric.is_global_zero:  # for nlbfab-all's live table
            write_progress(run_dir, epoch=epoch, best=state["best"], best_epoch=state["best_epoch"],
                           max_epochs=config.max_epochs, device=str(fabric.device))
        if improved:
            _save_atomic(fabric, checkpoints / "best.ckpt", state)
        if not quiet:
            name = "val co-bps" if split.phase == "val" else "-val loss"
            fabric.print(f"epoch {epoch:4d}  train {train_loss:.5f}  val {val_loss:.5f}  {name} {value:.4f}"
                         f"  best {state['best']:.4f} @ {state['best_epoch']}  {time.perf_counter() - started:6.1f} s")
        if (epoch + 1) % config.log_every_n_epochs == 0:
            scores, _ = run_hooks(fabric, module, data, epoch)
            if scores and not quiet:
                fabric.print(f"epoch {epoch:4d}  nlb: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if state["stale"] >= config.patience:
            stop_reason = f"no improvement for {config.patience} epochs"
            break
        # a further plateau at the lowest lr: what is left are gains too small to wait for
        if next_lr < lr and next_lr < config.min_lr:
            stop_reason = f"no improvement for {config.lr_patience} epochs at the lowest learning rate ({lr:.3g})"
            break
    return finish(fabric, module, data, config, run_dir, state, stop_reason, time.perf_counter() - started,
                  prep_home, file_names)


def log_final_metrics(logger, config: TrainConfig, summary: dict) -> None:
    """The run's settings with its final scores, for TensorBoard's HPARAMS tab to compare runs:
    the submission's NLB metrics on the val phase, the best held-in validation loss on the test
    phase, and the best epoch."""
    final = {f"final/{name}": value for name, value in summary.get("metrics", {}).items()}
    if "metrics" not in summary:
        final["final/val loss"] = -summary["best_monitored"]
    final["final/best epoch"] = summary["best_epoch"]
    logger.log_hyperparams(asdict(config), metrics=final)


def finish(fabric, module, data: SplitData, config: TrainConfig, run_dir: Path, state: dict,
           stop_reason: str, seconds: float, prep_home: Path, file_names: dict[str, str]) -> dict:
    """Reload the best checkpoint, run the hooks on it, merge its rates into the run's
    submission file and, on the val phase, score that file as EvalAI would."""
    best = run_dir / "checkpoints" / "best.ckpt"
    fabric.load(best, {"model": module}, strict=False)
    scores, predictions = run_hooks(fabric, module, data, state["best_epoch"])
    summary = {"split": data.split.name, "model": config.model, "epochs": state["epoch"],
               "best_epoch": state["best_epoch"], "best_monitored": state["best"],
               "stop_reason": stop_reason, "seconds": round(seconds, 2), "hook_metrics": scores,
               "run_dir": str(run_dir)}
    if fabric.is_global_zero:
        prep_dir = Path(prep_home) / data.split.name
        path = submit(data.split, predictions, run_dir.parent, prep_dir, file_names)
        summary["submission"] = str(path)
        if data.split.phase == "val":
            summary["metrics"] = score(prep_dir / file_names["eval_target"], path, data.split)
        log_final_metrics(fabric.logger, config, summary)
        (run_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    fabric.barrier()
    return summary
