"""One preprocessed split as one immutable value, and batches drawn from it.

The whole split lives on the training device (NLB splits are small: mc_maze at 5 ms is about
100 MB), so a batch is an index into tensors already there: no DataLoader, no workers.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np
import torch

from nlbfab.errors import UserError, first_line
from nlbfab.layout import Homes
from nlbfab.splits import Split, as_test_phase


@dataclass(frozen=True)
class SplitData:
    """Everything the loop, the hooks and the submission need from one split.

    Tensors (float32, on the training device):
      ``train_heldin``: (train trials, bins, heldin) - the model's input;
      ``train_recon``: (train trials, bins + fwd, heldin + heldout) - the reconstruction target;
      ``eval_heldin``: (eval trials, bins, heldin);
      ``eval_recon``: (eval trials, bins + fwd, heldin + heldout) on the val phase, NaN-free
        (for dmfc_rsg built with the training window), else the held-in observed bins only
        (``with_eval_heldin`` leaves NaN where it trains on them).
    ``target``: the official eval target group as numpy arrays (val phase; ``{}`` on test),
    what ``nlb_tools.evaluation.evaluate`` scores; ``train_behavior`` goes with it.
    """

    split: Split
    train_heldin: torch.Tensor
    train_recon: torch.Tensor
    eval_heldin: torch.Tensor
    eval_recon: torch.Tensor
    heldout: int
    fwd_steps: int
    target: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def heldin(self) -> int:
        return self.train_heldin.shape[2]

    @property
    def bins(self) -> int:
        return self.train_heldin.shape[1]

    def to(self, device) -> "SplitData":
        move = {k: getattr(self, k).to(device) for k in ("train_heldin", "train_recon", "eval_heldin", "eval_recon")}
        return SplitData(self.split, heldout=self.heldout, fwd_steps=self.fwd_steps, target=self.target, **move)


def _read(path: Path, rebuild: str) -> dict:
    if not path.is_file():
        raise UserError(f"missing {path}: run '{rebuild}'")
    try:
        with h5py.File(path, "r") as h5:
            return {k: ({n: v[()] for n, v in h5[k].items()} if isinstance(h5[k], h5py.Group) else h5[k][()])
                    for k in h5}
    except (OSError, KeyError) as error:
        raise UserError(f"cannot read {path} ({error}): run '{rebuild}'") from None


def _require(arrays: dict, keys: set[str], path: Path, rebuild: str) -> None:
    """Every key training, the hooks and the scoring will read, checked now rather than found
    missing after training."""
    missing = sorted(keys - set(arrays))
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: run '{rebuild}'")


def _float_tensor(array) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, np.float32))


TRAIN_KEYS = {"train_spikes_heldin", "train_spikes_heldout", "train_spikes_heldin_forward",
              "train_spikes_heldout_forward"}
# what the loss (forward bins) and nlb_tools' evaluate() (velocity decoding, PSTHs) read
TARGET_KEYS = {"eval_spikes_heldout", "eval_spikes_heldin_forward", "eval_spikes_heldout_forward",
               "train_behavior", "eval_behavior"}


def load_split(split: Split, homes: Homes) -> SplitData:
    """Read a preprocessed split; a missing, corrupt or inconsistent file, or one without a key
    that training, the hooks or the scoring read, fails at once with a message naming it and the
    ``nlbfab-prep`` command that rebuilds it; a split never preprocessed names the command that
    makes it."""
    if not homes.split_dir(split).is_dir():
        raise UserError(f"{split.name} is not preprocessed: run 'bin/nlbfab-prep --split {split.name}'")
    rebuild = f"bin/nlbfab-prep --split {split.name} --force"
    paths = {kind: homes.split_file(split, kind) for kind in ("train_input", "eval_input", "eval_target")}
    train = _read(paths["train_input"], rebuild)
    _require(train, TRAIN_KEYS, paths["train_input"], rebuild)
    evaluation = _read(paths["eval_input"], rebuild)
    _require(evaluation, {"eval_spikes_heldin"} | ({"eval_spikes_heldout"} if split.phase == "val" else set()),
             paths["eval_input"], rebuild)
    target = {}
    if split.phase == "val":
        target = _read(paths["eval_target"], rebuild).get(split.group)
        if target is None:
            raise UserError(f"{paths['eval_target']} has no group {split.group}: run '{rebuild}'")
        _require(target, TARGET_KEYS | ({"eval_cond_idx"} if "psth" in target else set()), paths["eval_target"], rebuild)
    window_target = homes.split_file(split, "eval_target_train_window")
    # dmfc_rsg: the NaN-free variant of the target for the loss
    loss_target = _read(window_target, rebuild)[split.group] if target and window_target.is_file() else target
    try:
        data = _assemble(split, train, evaluation, target, loss_target)
    except ValueError as error:  # arrays of different trials, bins or units
        raise UserError(f"tensors in {homes.split_dir(split)} do not fit together ({first_line(error)}): "
                        f"run '{rebuild}'") from None
    _check_shapes(data, homes.split_dir(split), rebuild)
    return data


def _assemble(split: Split, train: dict, evaluation: dict, target: dict, loss_target: dict) -> SplitData:
    """The split's tensors from its files' arrays: the train target (observed and forward bins,
    held-in and held-out units) and, on the val phase, the eval trials' likewise."""
    if not len(train["train_spikes_heldin"]) or not len(evaluation["eval_spikes_heldin"]):
        raise ValueError("no train or no eval trials")
    observed = np.concatenate([train["train_spikes_heldin"], train["train_spikes_heldout"]], -1)
    forward = np.concatenate([train["train_spikes_heldin_forward"], train["train_spikes_heldout_forward"]], -1)
    heldout, fwd_steps = train["train_spikes_heldout"].shape[2], forward.shape[1]
    eval_heldin = evaluation["eval_spikes_heldin"]
    eval_recon = eval_heldin
    if split.phase == "val":
        eval_recon = np.concatenate([
            np.concatenate([eval_heldin, evaluation["eval_spikes_heldout"]], -1),
            np.concatenate([loss_target["eval_spikes_heldin_forward"], loss_target["eval_spikes_heldout_forward"]], -1),
        ], 1)
    return SplitData(split, _float_tensor(train["train_spikes_heldin"]), _float_tensor(np.concatenate([observed, forward], 1)),
                     _float_tensor(eval_heldin), _float_tensor(eval_recon), heldout, fwd_steps, target)


def _check_shapes(data: SplitData, folder: Path, rebuild: str) -> None:
    n_train, bins, heldin = data.train_heldin.shape
    problems = []
    if data.train_recon.shape != (n_train, bins + data.fwd_steps, heldin + data.heldout):
        problems.append(f"train target {tuple(data.train_recon.shape)}")
    if data.eval_heldin.shape[1:] != (bins, heldin):
        problems.append(f"eval_spikes_heldin {tuple(data.eval_heldin.shape)}")
    if data.split.phase == "val" and data.eval_recon.shape[1:] != (bins + data.fwd_steps, heldin + data.heldout):
        problems.append(f"eval target {tuple(data.eval_recon.shape)}")
    if problems:
        raise UserError(f"tensors in {folder} disagree with train_spikes_heldin {(n_train, bins, heldin)}: "
                        f"{', '.join(problems)}; run '{rebuild}'")
    for name in ("train_recon", "eval_recon"):
        if torch.isnan(getattr(data, name)).any():
            raise UserError(f"NaN spikes in the {name.split('_')[0]} tensors of {folder}: run '{rebuild}'")


# the share of the test-phase eval trials' held-in entries that --train-eval-heldin keeps out of
# training to monitor instead (lfads-torch's sample validation)
MONITORED_SHARE = 0.2


@dataclass(frozen=True)
class TrainingPool:
    """The trials a training epoch draws its batches from: ``heldin (trials, bins, heldin)``, the
    model's input, and ``target (trials, bins + fwd, heldin + heldout)``, whose NaN entries are
    unknown and train nothing (``nlbfab.loss.poisson_nll``)."""

    heldin: torch.Tensor
    target: torch.Tensor


def train_trials_only(data: SplitData) -> TrainingPool:
    """The pool of a run without ``--train-eval-heldin``: the train trials and their targets."""
    return TrainingPool(data.train_heldin, data.train_recon)


def with_eval_heldin(data: SplitData, seed: int) -> tuple[SplitData, TrainingPool]:
    """Training on the eval trials' held-in spikes (the model's input in any case) as well as the
    train trials: the pool adds each eval trial with its held-in observed bins as the target, its
    held-out neurons and forward bins unknown. The val phase monitors val co-bps on the held-out neurons,
    which training never sees. The test phase monitors the held-in loss of its eval trials,
    which training would now fit: a fixed ``MONITORED_SHARE`` of those entries (drawn with
    ``seed``) leaves the pool, and the returned split's ``eval_recon`` keeps only them, so that
    the monitor scores entries no step trained on. Both tensors on ``data``'s device."""
    trained = data.eval_heldin
    if data.split.phase == "test":
        generator = torch.Generator().manual_seed(seed)
        monitored = (torch.rand(data.eval_heldin.shape, generator=generator) < MONITORED_SHARE).to(data.eval_heldin.device)
        trained = data.eval_heldin.masked_fill(monitored, float("nan"))
        data = replace(data, eval_recon=data.eval_recon.masked_fill(~monitored, float("nan")))
    pool = TrainingPool(torch.cat([data.train_heldin, data.eval_heldin]),
                        torch.cat([data.train_recon, heldin_only(trained, data.train_recon.shape[1:])]))
    return data, pool


def heldin_only(heldin: torch.Tensor, target_shape: tuple[int, ...]) -> torch.Tensor:
    """The targets, of ``target_shape`` (bins + fwd, heldin + heldout), of trials known by their
    held-in spikes alone: those in the observed bins of the held-in units, NaN (unknown, trained
    on by nothing) for the held-out units and the forward bins."""
    trials, bins, units = heldin.shape
    target = heldin.new_full((trials, *target_shape), float("nan"))
    target[:, :bins, :units] = heldin
    return target


def load_test_heldin(data: SplitData, homes: Homes) -> torch.Tensor:
    """The held-in spikes of the test trials of a val split's dataset, at its bin width: the test
    split's eval input (the test NWB file's trials, whose held-out neurons and forward bins no one
    is given). A missing file, or one whose trials are not ``data``'s bins and held-in units, fails
    naming the ``nlbfab-prep`` that makes it."""
    test = as_test_phase(data.split)
    if not homes.split_dir(test).is_dir():
        raise UserError(f"--train-test-heldin reads {test.name}, which is not preprocessed: "
                        f"run 'bin/nlbfab-prep --split {test.name}'")
    rebuild = f"bin/nlbfab-prep --split {test.name} --force"
    path = homes.split_file(test, "eval_input")
    arrays = _read(path, rebuild)
    _require(arrays, {"eval_spikes_heldin"}, path, rebuild)
    heldin = _float_tensor(arrays["eval_spikes_heldin"])
    expected = (data.bins, data.heldin)
    if heldin.ndim != 3 or tuple(heldin.shape[1:]) != expected or torch.isnan(heldin).any():
        raise UserError(f"{path}: eval_spikes_heldin {tuple(heldin.shape)} is not test trials x {expected[0]} bins x "
                        f"{expected[1]} held-in units without NaN: run '{rebuild}'")
    return heldin


def with_test_heldin(pool: TrainingPool, test_heldin: torch.Tensor) -> TrainingPool:
    """``pool`` and the test trials, their held-in spikes the input and the only target (a val
    run's more trials of the dataset's own neurons and dynamics; nothing of theirs is scored)."""
    test_heldin = test_heldin.to(pool.heldin.device)
    return TrainingPool(torch.cat([pool.heldin, test_heldin]),
                        torch.cat([pool.target, heldin_only(test_heldin, pool.target.shape[1:])]))


def batch_indices(n_trials: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A seeded random permutation of ``range(n_trials)`` cut into batches (the last may be short)."""
    return list(torch.randperm(n_trials, generator=generator).split(batch_size))
