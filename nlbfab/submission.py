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
