"""Preprocess NWB datasets into per-split HDF5 tensors, as ``nlb_tools.make_tensors`` makes them.

Two engines make the same tensors: ``native`` (the default) reads the NWB files lazily and cuts
every tensor straight from spike times, trial tables and behaviour series (``nlbfab.native``:
no 1 ms frame of the whole recording, under 2 GB and several times faster on mc_maze);
``nlb_tools`` loads each dataset into nlb_tools' ``NWBDataset`` and calls its tensor makers,
as nlb-lightning did (about 10 GB for mc_maze). benchmarks/README.md has the numbers.

For each split, ``PREP_HOME/{split}/`` holds what nlb-lightning trained from:
``train_input.h5`` (train trials: held-in/held-out spikes, forward-prediction spikes,
behaviour), ``eval_input.h5`` (eval trials' held-in spikes, and held-out on the val phase) and,
on the val phase, ``eval_target.h5``: the official target that EvalAI scores. For dmfc_rsg the
official target is NaN-padded (set..go windows of unequal length), so a NaN-free target built
with the training window is kept beside it as ``eval_target_train_window.h5`` for the loss.

A split folder appears only when complete: it is built under a hidden name and renamed into
place, so an interrupted run never leaves a half-written split that looks done.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from nlb_tools.make_tensors import (PARAMS, make_eval_input_tensors, make_eval_target_tensors,
                                    make_train_input_tensors, save_to_h5)

from nlbfab.errors import UserError
from nlbfab.layout import PREP_MARKER, Homes
from nlbfab.native.session import open_session
from nlbfab.native.tensors import split_tensors as native_split_tensors
from nlbfab.native.tensors import value_fields
from nlbfab.nwb import load_dataset, reused_by_nlb_tools
from nlbfab.splits import Dataset, Split


def source_files(homes: Homes, dataset: Dataset) -> list[Path]:
    return sorted(homes.dataset_dir(dataset).glob("*.nwb"))


def _fingerprint(sources: Iterable[Path]) -> list[dict]:
    return [{"file": p.name, "bytes": p.stat().st_size, "mtime": p.stat().st_mtime} for p in sources]


def is_up_to_date(split: Split, homes: Homes) -> bool:
    """True when the split folder is complete and was made from the current NWB files."""
    marker = homes.prep_marker(split)
    if not marker.is_file():
        return False
    try:  # a prep.json cut short or edited by hand: the split is made again
        made = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(made, dict) and made.get("sources") == _fingerprint(source_files(homes, split.dataset)) and \
        made.get("files") == homes.split_file_names()


def missing_data_hint(datasets: list[Dataset]) -> str:
    """The commands that fetch or make the NWB files of ``datasets``."""
    options = " ".join(f"--dataset {d.name}" for d in datasets)
    return f"run 'bin/nlbfab-download {options}' for the real data or 'bin/nlbfab-synth {options}' for synthetic data"


def split_tensors(binned, split: Split) -> dict[str, dict]:
    """The tensors of one split from a dataset already resampled to ``split.bin_ms``.

    Returns ``{"train_input": {...}, "eval_input": {...}}`` plus, on the val phase,
    ``"eval_target"`` (and for dmfc_rsg ``"eval_target_train_window"``), ready for ``save_to_h5``.
    """
    name = split.dataset.name
    tensors = {
        "train_input": make_train_input_tensors(
            binned, name, trial_split=split.train_splits, save_file=False,
            include_behavior=True, include_forward_pred=True),
        "eval_input": make_eval_input_tensors(binned, name, trial_split=split.eval_split, save_file=False),
    }
    if split.phase == "val":
        tensors["eval_target"] = make_eval_target_tensors(
            binned, name, train_trial_split="train", eval_trial_split="val", save_file=False,
            include_psth="psth_params" in PARAMS[name])
        if name == "dmfc_rsg":
            tensors["eval_target_train_window"] = make_eval_target_tensors(
                binned, name, train_trial_split="train", eval_trial_split="val", save_file=False,
                update_params={"eval_make_params": PARAMS[name]["make_params"]})
    return tensors


def _write_split(split: Split, tensors: dict[str, dict], homes: Homes, sources: list[Path]) -> Path:
    """Write the split's files under a hidden folder, then swap it into place."""
    final = homes.split_dir(split)
    partial = final.with_name(f".{split.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for kind, data in tensors.items():
        save_to_h5(data, str(partial / homes.split_file(split, kind).name), overwrite=True)
    (partial / PREP_MARKER).write_text(json.dumps(
        {"split": split.name, "group": split.group, "files": homes.split_file_names(),
         "sources": _fingerprint(sources)}, indent=1))
    old = final.with_name(f".{split.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _native_engine(folder: Path, splits: list[Split], report: Callable[[str], None]) -> Iterator[tuple[Split, dict]]:
    """Each split's tensors, cut by ``nlbfab.native`` from one lazy read of the folder."""
    started = time.perf_counter()
    session = open_session(folder, value_fields(splits[0].dataset.name))
    report(f"{splits[0].dataset.name}: read in {time.perf_counter() - started:.1f} s")
    for split in splits:
        yield split, native_split_tensors(session, split)


def _nlb_tools_engine(folder: Path, splits: list[Split], report: Callable[[str], None]) -> Iterator[tuple[Split, dict]]:
    """Each split's tensors from nlb_tools' tensor makers, on one load of the folder resampled
    once per bin width."""
    started = time.perf_counter()
    loaded = load_dataset(folder)
    report(f"{splits[0].dataset.name}: loaded in {time.perf_counter() - started:.1f} s")
    with reused_by_nlb_tools(loaded):  # its PSTH step copies `loaded` instead of reading the files again
        for bin_ms in sorted({s.bin_ms for s in splits}):
            binned = copy.copy(loaded)
            binned.data = loaded.data.copy()  # resample mutates the frame; keep the 1 ms data intact
            binned.resample(bin_ms)
            for split in [s for s in splits if s.bin_ms == bin_ms]:
                yield split, split_tensors(binned, split)
            del binned


ENGINES = {"native": _native_engine, "nlb_tools": _nlb_tools_engine}


def prepare_dataset(dataset: Dataset, splits: list[Split], homes: Homes, force: bool = False,
                    report: Callable[[str], None] = print, engine: str = "native") -> list[Split]:
    """Preprocess ``splits`` (all of ``dataset``) from one read of its NWB files, with ``engine``
    (``native`` or ``nlb_tools``). Up-to-date splits are skipped unless ``force``. Returns the
    splits that were written."""
    todo = [s for s in splits if force or not is_up_to_date(s, homes)]
    for s in splits:
        if s not in todo:
            report(f"  {s.name}: up to date, skipped (--force to redo)")
    if not todo:
        return []
    sources = source_files(homes, dataset)
    if not sources:
        raise UserError(f"no NWB files for {dataset.name} in {homes.dataset_dir(dataset)}: "
                        f"{missing_data_hint([dataset])}")
    report(f"{dataset.name}: reading {len(sources)} NWB files from {homes.dataset_dir(dataset)} ({engine} engine)")
    started = time.perf_counter()
    for split, tensors in ENGINES[engine](homes.dataset_dir(dataset), todo, report):
        report(f"  {split.name}: written to {_write_split(split, tensors, homes, sources)}")
    report(f"{dataset.name}: {len(todo)} split(s) in {time.perf_counter() - started:.1f} s")
    return todo


def prepare_splits(splits: list[Split], homes: Homes, force: bool = False,
                   report: Callable[[str], None] = print, engine: str = "native") -> int:
    """Preprocess ``splits`` dataset by dataset (one read each) with ``engine``; returns how many
    were written. Every dataset's NWB files are looked for first, so a long run does not stop
    half-way."""
    splits = list(dict.fromkeys(splits))
    by_dataset = {d: [s for s in splits if s.dataset == d] for d in dict.fromkeys(s.dataset for s in splits)}
    missing = [d for d in by_dataset if not source_files(homes, d)]
    if missing:
        raise UserError(f"no NWB files for {', '.join(d.name for d in missing)} under {homes.data}: "
                        f"{missing_data_hint(missing)}")
    started = time.perf_counter()
    written = 0
    for number, (dataset, group) in enumerate(by_dataset.items(), 1):
        report(f"[{number}/{len(by_dataset)}] {dataset.name}: {', '.join(s.name for s in group)}")
        written += len(prepare_dataset(dataset, group, homes, force, report, engine))
    report(f"done: {written} split(s) written, {len(splits) - written} up to date, "
           f"in {time.perf_counter() - started:.1f} s under {homes.prep}")
    return written
