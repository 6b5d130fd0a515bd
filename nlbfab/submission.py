"""The EvalAI submission file: one HDF5 per phase, one group per split (``mc_maze_20``, ...).

Each run first writes its own rates into its split folder (one group in the submission's
layout); the phase's submission file is merged from these files, so it can always be rebuilt
(``nlbfab-submit``), and a damaged one is set aside and rebuilt rather than blocking the runs
that write into it. Many training processes may add their split at once,
so a merge takes a lock, copies the file to a new one with the split's group replaced, and
renames it over the old: readers never see a half-written file, and no other split's group is lost.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
from filelock import FileLock

from nlbfab import layout
from nlbfab.errors import UserError
from nlbfab.splits import ALL_SPLITS

REQUIRED = ("train_rates_heldin", "train_rates_heldout", "eval_rates_heldin", "eval_rates_heldout")
OPTIONAL = ("eval_rates_heldin_forward", "eval_rates_heldout_forward")
PHASES = ("val", "test")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


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


def write_rates(path: Path, group: str, phase: str, rates: dict[str, np.ndarray]) -> Path:
    """One split's rates (spikes per bin) as group ``group`` of a file of their own, written
    atomically (a temporary file, then a rename), tagged with the phase they belong to."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = layout.partial(path)
    with h5py.File(partial, "w") as h5:
        h5.attrs["phase"] = phase
        for key, value in rates.items():
            h5.create_dataset(f"{group}/{key}", data=np.asarray(value, np.float32))
    os.replace(partial, path)
    return path


def rates_files(run_dir: Path, phase: str, report: Callable[[str], None] = _stderr) -> list[Path]:
    """The readable rates files of ``phase`` in a run's split folders; a damaged one is named
    (with what remakes it) and left out, so that it cannot block the others."""
    found = []
    for path in sorted(layout.rates_file(folder) for folder in Path(run_dir).iterdir()):
        if not path.is_file():
            continue
        try:
            with h5py.File(path, "r") as h5:
                if h5.attrs.get("phase") == phase:
                    found.append(path)
        except OSError:
            report(f"warning: {path} is damaged and left out; train {path.parent.name} again to replace it")
    return found


def _readable(path: Path) -> bool:
    """Whether HDF5 can open ``path`` and list every array in it (a truncated file fails here)."""
    try:
        with h5py.File(path, "r") as h5:
            h5.visititems(lambda name, item: item.shape if isinstance(item, h5py.Dataset) else None)
        return True
    except (OSError, RuntimeError, KeyError):
        return False


def _set_aside(path: Path) -> Path:
    aside = layout.damaged_submission(path, time.strftime('%Y%m%d-%H%M%S'))
    os.replace(path, aside)
    return aside


def merge_rates(path: Path, sources: list[Path], all_sources: Callable[[], list[Path]],
                report: Callable[[str], None] = _stderr, keep: Callable[[], set[str]] | None = None) -> Path:
    """Put the group of each rates file in ``sources`` into the submission file ``path``,
    replacing older ones and keeping every other group. A damaged ``path`` is moved aside (named
    in one line) and rebuilt from ``all_sources()``, the run folders' rates files of its phase.
    With ``keep``, groups not in ``keep()`` (read under the lock) are dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        partial = layout.partial(path)
        partial.unlink(missing_ok=True)  # left by a writer that was killed: never build on it
        if path.exists() and not _readable(path):
            aside = _set_aside(path)
            report(f"warning: {path} was damaged: moved to {aside.name}, rebuilt from the run folders' rates")
            sources = list(dict.fromkeys([*all_sources(), *sources]))
        try:
            if path.exists():
                shutil.copyfile(path, partial)
            with h5py.File(partial, "a") as h5:
                kept = keep() if keep else set(h5)
                for group in [g for g in h5 if g not in kept]:
                    del h5[group]
                for source in sources:
                    with h5py.File(source, "r") as rates:
                        for group in rates:
                            if group in h5:
                                del h5[group]
                            rates.copy(rates[group], h5, name=group)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, path)
    return path


def shapes(train_trials: int, eval_trials: int, bins: int, fwd: int, heldin: int, heldout: int) -> dict[str, tuple]:
    """The shape each submission array of a split must have."""
    return {
        "train_rates_heldin": (train_trials, bins, heldin), "train_rates_heldout": (train_trials, bins, heldout),
        "eval_rates_heldin": (eval_trials, bins, heldin), "eval_rates_heldout": (eval_trials, bins, heldout),
        "eval_rates_heldin_forward": (eval_trials, fwd, heldin),
        "eval_rates_heldout_forward": (eval_trials, fwd, heldout),
    }


def expected_shapes(split, homes: layout.Homes) -> dict[str, tuple[int, ...]]:
    """``shapes`` of a split, read from its preprocessed files."""
    with h5py.File(homes.split_file(split, "train_input"), "r") as train, \
            h5py.File(homes.split_file(split, "eval_input"), "r") as evaluation:
        trials_train, bins, heldin = train["train_spikes_heldin"].shape
        return shapes(trials_train, evaluation["eval_spikes_heldin"].shape[0], bins,
                      train["train_spikes_heldin_forward"].shape[1], heldin, train["train_spikes_heldout"].shape[2])


def submit(split, rates: dict[str, np.ndarray], run_dir: Path, expected: dict[str, tuple],
           report: Callable[[str], None] = _stderr) -> Path:
    """Validate ``rates`` against ``expected`` (``shapes`` of the split), write them to the
    split's folder of the run (``run_dir``: ``RUNS_HOME/{run_tag}``) and merge them into the run's
    submission file of the split's phase. Train-window arrays (``train_rates_*_forward``) are
    dropped: EvalAI takes only the arrays in ``REQUIRED`` and ``OPTIONAL``."""
    rates = {k: v for k, v in rates.items() if k in REQUIRED + OPTIONAL}
    check_rates(rates, expected, split.group)
    own = write_rates(layout.rates_file(Path(run_dir) / split.name), split.group, split.phase, rates)
    return merge_rates(layout.submission_file(run_dir, split.phase), [own],
                       lambda: rates_files(run_dir, split.phase, report), report)


def split_groups(run_dir: Path, phase: str) -> set[str]:
    """The submission groups of the run's split folders of ``phase`` that hold a rates file
    (damaged ones too: their group stays until the split is trained again)."""
    splits = {split.name: split for split in ALL_SPLITS if split.phase == phase}
    return {splits[folder.name].group for folder in Path(run_dir).iterdir()
            if folder.name in splits and layout.rates_file(folder).is_file()}


def rebuild(run_dir: Path, report: Callable[[str], None] = _stderr) -> dict[str, list[str]]:
    """Merge every split folder's rates of a run into its submission files (a damaged file is
    set aside first). Returns each rebuilt file's groups, by path."""
    said = []

    def once(line: str) -> None:  # a damaged rates file is found while looking for each phase's
        if line not in said:
            said.append(line)
            report(line)

    rebuilt = {}
    for phase in PHASES:
        sources = rates_files(run_dir, phase, once)
        if sources:
            path = merge_rates(layout.submission_file(run_dir, phase), sources, lambda: sources, once,
                               keep=lambda phase=phase: split_groups(run_dir, phase))
            with h5py.File(path, "r") as h5:
                rebuilt[str(path)] = sorted(h5)
        else:  # every split folder of this phase was removed: so are their groups, and the file
            path = layout.submission_file(run_dir, phase)
            with FileLock(str(path) + ".lock"):
                if path.exists() and not split_groups(run_dir, phase):
                    path.unlink()
                    report(f"{path}: removed (no split folder of the {phase} phase has rates)")
    if not rebuilt:
        raise UserError(f"no split of run {run_dir} has its rates: train a split with this --run-tag first")
    return rebuilt
