"""The EvalAI submission file: one HDF5 per phase, one group per split (``mc_maze_20``, ...).

Many training processes may add their split to the same ``submission-{phase}.h5`` at once, so a
merge takes a lock, copies the file to a new one with the split's group replaced, and renames it
over the old: readers never see a half-written file, and no other split's group is lost.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock

from nlbfab.errors import UserError

REQUIRED = ("train_rates_heldin", "train_rates_heldout", "eval_rates_heldin", "eval_rates_heldout")
OPTIONAL = ("eval_rates_heldin_forward", "eval_rates_heldout_forward")


def check_rates(rates: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], group: str) -> None:
    """Fail with one line if a required array is missing, an array is unknown, or a shape is off."""
    missing = [k for k in REQUIRED if k not in rates]
    unknown = [k for k in rates if k not in REQUIRED + OPTIONAL]
    if missing or unknown:
        raise UserError(f"submission group {group}: missing {missing}, unknown {unknown}; "
                        f"expected {list(REQUIRED)} (+ optional {list(OPTIONAL)})")
    for key, shape in expected.items():
        if key in rates and tuple(rates[key].shape) != tuple(shape):
            raise UserError(f"submission group {group}: {key} has shape {tuple(rates[key].shape)}, "
                            f"the split's tensors need {tuple(shape)}")
        if key in rates and not np.all(np.isfinite(rates[key])):
            raise UserError(f"submission group {group}: {key} holds NaN or infinite rates")


def merge_group(path: Path, group: str, rates: dict[str, np.ndarray]) -> Path:
    """Put ``rates`` (spikes per bin) into ``path`` as group ``group``, replacing an older one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        partial = path.with_name(f".{path.name}.partial")
        if path.exists():
            shutil.copyfile(path, partial)
        with h5py.File(partial, "a") as h5:
            if group in h5:
                del h5[group]
            for key, value in rates.items():
                h5.create_dataset(f"{group}/{key}", data=np.asarray(value, np.float32))
        os.replace(partial, path)
    return path


def expected_shapes(split_dir: Path, file_names: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """The shape each submission array of a split must have, read from its preprocessed files."""
    with h5py.File(split_dir / file_names["train_input"], "r") as train, \
            h5py.File(split_dir / file_names["eval_input"], "r") as evaluation:
        trials_train, bins, heldin = train["train_spikes_heldin"].shape
        heldout = train["train_spikes_heldout"].shape[2]
        fwd = train["train_spikes_heldin_forward"].shape[1]
        trials_eval = evaluation["eval_spikes_heldin"].shape[0]
    return {
        "train_rates_heldin": (trials_train, bins, heldin), "train_rates_heldout": (trials_train, bins, heldout),
        "eval_rates_heldin": (trials_eval, bins, heldin), "eval_rates_heldout": (trials_eval, bins, heldout),
        "eval_rates_heldin_forward": (trials_eval, fwd, heldin),
        "eval_rates_heldout_forward": (trials_eval, fwd, heldout),
    }


def submission_path(run_dir: Path, phase: str) -> Path:
    return Path(run_dir) / f"submission-{phase}.h5"


def submit(split, rates: dict[str, np.ndarray], run_dir: Path, split_dir: Path,
           file_names: dict[str, str]) -> Path:
    """Validate ``rates`` against the split's tensors and merge them into the run's
    ``submission-{phase}.h5``. Train-window arrays (``train_rates_*_forward``) are dropped:
    EvalAI takes only the arrays in ``REQUIRED`` and ``OPTIONAL``."""
    rates = {k: v for k, v in rates.items() if k in REQUIRED + OPTIONAL}
    check_rates(rates, expected_shapes(split_dir, file_names), split.group)
    return merge_group(submission_path(run_dir, split.phase), split.group, rates)
