"""The one place that knows the NLB'21 datasets and their 28 splits.

A split is ``{dataset}-{bin:02}ms-{phase}``: 7 datasets x bin width 5 or 20 ms x phase ``val``
(train on 'train', score 'val' locally) or ``test`` (train on 'train'+'val', predict the hidden
'test' trials that only EvalAI scores). Everything else in nlbfab asks this module for names,
shapes and DANDI locations instead of spelling them out again.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from nlbfab.errors import UserError

BIN_WIDTHS_MS = (5, 20)
PHASES = ("val", "test")
FORWARD_MS = 200


@dataclass(frozen=True)
class Dataset:
    """Facts about one NLB dataset, as published on DANDI.

    Trial counts are the real ones: ``train``/``val`` of the val phase and ``test`` of the
    hidden test file (the test phase trains on ``train + val``).
    """

    name: str
    dandi_set: str
    dandi_version: str  # the published version the benchmark used (mc_rtt: its first one)
    subject: str
    session: str  # the ``ses-`` part of the file names, or "" where DANDI has none
    train_desc: str  # the ``desc-`` part of the train file, e.g. "train_behavior+ecephys"
    heldin: int
    heldout: int
    train: int
    val: int
    test: int
    window_ms: int  # length of the aligned training window
    behavior: str | None  # the behaviour TimeSeries scored by vel R2, if any

    @property
    def folder(self) -> str:
        """The DANDI folder that holds the dataset's two NWB files, e.g. ``000128/sub-Jenkins``."""
        return f"{self.dandi_set}/sub-{self.subject}"

    def file_name(self, which: str) -> str:
        """The DANDI file name of the ``train`` or ``test`` NWB file."""
        ses = f"_ses-{self.session}" if self.session else ""
        desc = self.train_desc if which == "train" else "test_ecephys"
        return f"sub-{self.subject}{ses}_desc-{desc}.nwb"


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset("mc_maze", "000128", "0.220113.0400", "Jenkins", "full", "train_behavior+ecephys",
                137, 45, 1721, 574, 574, 700, "hand_vel"),
        Dataset("mc_rtt", "000129", "0.241017.1444", "Indy", "", "train_behavior+ecephys",
                98, 32, 810, 270, 272, 600, "finger_vel"),
        Dataset("area2_bump", "000127", "0.220113.0359", "Han", "", "train_behavior+ecephys",
                49, 16, 272, 92, 98, 600, "hand_vel"),
        Dataset("dmfc_rsg", "000130", "0.220113.0407", "Haydn", "", "train_ecephys",
                45, 15, 741, 248, 252, 1500, None),
        Dataset("mc_maze_large", "000138", "0.220113.0407", "Jenkins", "large", "train_behavior+ecephys",
                122, 40, 375, 125, 100, 700, "hand_vel"),
        Dataset("mc_maze_medium", "000139", "0.220113.0408", "Jenkins", "medium", "train_behavior+ecephys",
                114, 38, 188, 62, 100, 700, "hand_vel"),
        Dataset("mc_maze_small", "000140", "0.220113.0408", "Jenkins", "small", "train_behavior+ecephys",
                107, 35, 75, 25, 100, 700, "hand_vel"),
    )
}


@dataclass(frozen=True)
class Split:
    """One of the 28 benchmark splits, e.g. ``mc_maze-20ms-val``."""

    dataset: Dataset
    bin_ms: int
    phase: str

    @property
    def name(self) -> str:
        return f"{self.dataset.name}-{self.bin_ms:02d}ms-{self.phase}"

    @property
    def group(self) -> str:
        """The group name nlb_tools and EvalAI use: ``mc_maze`` at 5 ms, ``mc_maze_20`` at 20 ms."""
        return self.dataset.name if self.bin_ms == 5 else f"{self.dataset.name}_{self.bin_ms}"

    @property
    def train_splits(self) -> list[str]:
        """The trial splits a model of this phase trains on."""
        return ["train"] if self.phase == "val" else ["train", "val"]

    @property
    def eval_split(self) -> str:
        return self.phase

    @property
    def train_trials(self) -> int:
        return self.dataset.train + (self.dataset.val if self.phase == "test" else 0)

    @property
    def eval_trials(self) -> int:
        return self.dataset.val if self.phase == "val" else self.dataset.test

    @property
    def bins(self) -> int:
        """Bins of the aligned window (without the forward-prediction bins)."""
        return self.dataset.window_ms // self.bin_ms

    @property
    def forward_bins(self) -> int:
        return FORWARD_MS // self.bin_ms

    def __str__(self) -> str:
        return self.name


ALL_SPLITS: tuple[Split, ...] = tuple(
    Split(d, b, p) for d in DATASETS.values() for b in BIN_WIDTHS_MS for p in PHASES
)
SPLIT_NAMES: tuple[str, ...] = tuple(s.name for s in ALL_SPLITS)


def get_split(name: str) -> Split:
    """The split called ``name``; a wrong name fails with the nearest valid ones."""
    for split in ALL_SPLITS:
        if split.name == name:
            return split
    near = difflib.get_close_matches(name, SPLIT_NAMES, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]}?" if near else f"valid splits: {', '.join(SPLIT_NAMES)}"
    raise UserError(f"unknown split '{name}': {hint} (format: dataset-BINms-phase, e.g. mc_maze-20ms-val)")


def as_test_phase(split: Split) -> Split:
    """The test-phase split of a val-phase one: the same dataset and bin width."""
    return replace(split, phase="test")


def get_dataset(name: str) -> Dataset:
    """The dataset called ``name``; a wrong name fails with the list of valid ones."""
    if name in DATASETS:
        return DATASETS[name]
    near = difflib.get_close_matches(name, DATASETS, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]}? " if near else ""
    raise UserError(f"unknown dataset '{name}': {hint}valid datasets: {', '.join(DATASETS)}")


def splits_of(dataset: Dataset) -> list[Split]:
    """The four splits of one dataset."""
    return [s for s in ALL_SPLITS if s.dataset == dataset]
