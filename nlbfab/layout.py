"""Where every file of nlbfab lives: the one module that knows folder and file names.

Three homes hold everything: ``DATA_HOME`` the NWB files in DANDI's layout (and a synthetic
dataset's truth), ``PREP_HOME`` one folder of tensors per split, ``RUNS_HOME`` one folder per run
tag, with the submission files its splits share and a folder per split (checkpoints, settings,
scores, progress, log, the split's own rates). ``Homes`` carries the three and the split file
names as one value; the functions below name each file, so a name changes in one place.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from nlbfab.errors import UserError

TRUTH_FILE = "synthetic_truth.h5"  # a synthetic dataset's ground truth, beside its NWB files
HIDDEN_DIR = "evalai"  # beside them: a synthetic dataset's test file as EvalAI holds it (nlbfab.evalai_target)
TRAIN_WINDOW_TARGET = "eval_target_train_window.h5"  # dmfc_rsg's NaN-free eval target, for the loss
PREP_MARKER = "prep.json"  # written last into a split folder: what it was made from
RATES_FILE = "rates.h5"
LATENTS_FILE = "latents.h5"
CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
PROGRESS_FILE = "progress.json"
TRAIN_LOG = "train.log"
TENSORBOARD_FILES = ("events.out.tfevents.*",)
SEARCH = "search"  # RUNS_HOME/{run_tag}/search/{split}/: a hyperparameter search, one folder per trial
TUNE_DIR = "tune"  # Ray Tune's own state of the search, what --resume restores
SEARCH_PLAN = "search.json"
SEARCH_TRIALS = "trials.json"
BEST_CONFIG = "best.json"


@dataclass(frozen=True)
class Homes:
    """The three homes and the names of a split's three files (``.env`` can rename them)."""

    data: Path
    prep: Path
    runs: Path
    train_input: str = "train_input.h5"
    eval_input: str = "eval_input.h5"
    eval_target: str = "eval_target.h5"

    def dataset_dir(self, dataset) -> Path:
        """``DATA_HOME/000128/sub-Jenkins``: where DANDI's client puts a dataset's NWB files."""
        return dataset_dir(self.data, dataset)

    def split_dir(self, split) -> Path:
        return Path(self.prep) / split.name

    def split_file(self, split, kind: str) -> Path:
        """A split's ``train_input``, ``eval_input``, ``eval_target`` or ``eval_target_train_window`` file."""
        names = {"train_input": self.train_input, "eval_input": self.eval_input, "eval_target": self.eval_target,
                 "eval_target_train_window": TRAIN_WINDOW_TARGET}
        return self.split_dir(split) / names[kind]

    def split_file_names(self) -> dict[str, str]:
        """The names ``.env`` chose for a split's three files, by kind (recorded with each split,
        so that renaming them redoes the preprocessing)."""
        return {"train_input": self.train_input, "eval_input": self.eval_input, "eval_target": self.eval_target}

    def prep_marker(self, split) -> Path:
        return self.split_dir(split) / PREP_MARKER

    def tag_dir(self, run_tag: str) -> Path:
        """``RUNS_HOME/{run_tag}``: the submission files and one folder per split."""
        check_run_tag(run_tag)
        return Path(self.runs) / run_tag

    def run_dir(self, run_tag: str, split) -> Path:
        return self.tag_dir(run_tag) / split.name


def check_run_tag(run_tag: str | None) -> None:
    """A run tag names one folder inside RUNS_HOME: never a path, nor RUNS_HOME or its parent."""
    if not re.fullmatch(r"[\w.+-]+", run_tag or "") or run_tag in (".", ".."):
        raise UserError(f"--run-tag {run_tag!r}: use letters, digits, '.', '_', '+' or '-' (it names a folder "
                        f"in RUNS_HOME)")


def search_dir(tag_dir: Path, split) -> Path:
    """``RUNS_HOME/{run_tag}/search/{split}``: a search's plan, trials table, best configuration,
    Ray Tune's state, and each trial's run: ``{trial}/{split}/``, a run of tag ``{trial}`` with this
    folder as its RUNS_HOME."""
    return Path(tag_dir) / SEARCH / split.name


def tune_dir(search: Path) -> Path:
    return Path(search) / TUNE_DIR


def search_plan(search: Path) -> Path:
    """What the search was asked to do, which ``--resume`` continues."""
    return Path(search) / SEARCH_PLAN


def search_trials(search: Path) -> Path:
    """Every trial's hyperparameters and val co-bps, best first."""
    return Path(search) / SEARCH_TRIALS


def best_config(search: Path) -> Path:
    """The best trial's settings, which ``nlbfab-train --config`` takes."""
    return Path(search) / BEST_CONFIG


def dataset_dir(data_home: Path, dataset) -> Path:
    return Path(data_home) / dataset.folder


def truth_file(data_home: Path, dataset) -> Path:
    return dataset_dir(data_home, dataset) / TRUTH_FILE


def hidden_test_file(data_home: Path, dataset) -> Path:
    """A synthetic dataset's test file with everything DANDI's copy leaves out, which scores the
    test phase as EvalAI does; in a folder of its own, so that loading the dataset skips it."""
    return dataset_dir(data_home, dataset) / HIDDEN_DIR / dataset.file_name("test")


def submission_file(tag_dir: Path, phase: str) -> Path:
    """What EvalAI takes: one file per phase, one group per split."""
    return Path(tag_dir) / f"submission-{phase}.h5"


def damaged_submission(path: Path, stamp: str) -> Path:
    return Path(path).with_name(f"{Path(path).name}.damaged-{stamp}")


def partial(path: Path) -> Path:
    """The hidden temporary file beside ``path`` that is renamed over it once complete."""
    return Path(path).with_name(f".{Path(path).name}.partial")


def checkpoint(run_dir: Path, which: str) -> Path:
    """``best`` or ``last``."""
    return Path(run_dir) / CHECKPOINTS / f"{which}.ckpt"


def config_file(run_dir: Path) -> Path:
    return Path(run_dir) / CONFIG_FILE


def metrics_file(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def rates_file(run_dir: Path) -> Path:
    return Path(run_dir) / RATES_FILE


def latents_file(run_dir: Path) -> Path:
    return Path(run_dir) / LATENTS_FILE


def train_log(run_dir: Path) -> Path:
    return Path(run_dir) / TRAIN_LOG


def old_run_files(run_dir: Path) -> list[Path]:
    """What a new run with the same tag and split replaces: logs, checkpoints, scores and latents."""
    run_dir = Path(run_dir)
    logs = [path for pattern in TENSORBOARD_FILES for path in run_dir.glob(pattern)]
    return [*logs, metrics_file(run_dir), checkpoint(run_dir, "best"), checkpoint(run_dir, "last"),
            latents_file(run_dir)]


def write_json(path: Path, value: dict) -> None:
    """Atomically: a reader never sees half a file."""
    temporary = partial(path)
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)


def write_progress(run_dir: Path, epoch: int, best: float, best_epoch: int, max_epochs: int, device: str) -> None:
    """Where a run is, for ``nlbfab-all``'s live table."""
    write_json(Path(run_dir) / PROGRESS_FILE, {"epoch": epoch, "best": best, "best_epoch": best_epoch,
                                               "max_epochs": max_epochs, "device": device})


def read_progress(run_dir: Path) -> dict:
    """``write_progress``'s fields, or ``{}`` before the run's first epoch."""
    try:
        return json.loads((Path(run_dir) / PROGRESS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def clear_progress(run_dir: Path) -> None:
    (Path(run_dir) / PROGRESS_FILE).unlink(missing_ok=True)


def read_metrics(run_dir: Path) -> dict:
    """A finished run's summary (``train.finish``), or ``{}``."""
    try:
        return json.loads(metrics_file(run_dir).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def run_state(run_dir: Path) -> str:
    """``finished`` (its scores written), ``interrupted`` (a last checkpoint) or ``new``."""
    if metrics_file(run_dir).is_file():
        return "finished"
    return "interrupted" if checkpoint(run_dir, "last").is_file() else "new"
