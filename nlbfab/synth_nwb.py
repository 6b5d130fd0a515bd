"""Write synthetic sessions as NWB files in DANDI's layout, and their ground truth beside them.

The files follow the real NLB files closely enough that ``nlb_tools.nwb_interface.NWBDataset``
and all of ``nlb_tools.make_tensors`` run on them unchanged: ``/units`` with ragged
``spike_times`` and ``obs_intervals`` and a ``heldout`` flag, ``/intervals/trials`` with the
dataset's fields and ``split``, and behaviour TimeSeries in ``/processing/behavior``.
"""
from __future__ import annotations

import copy
import json
import os
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from pynwb import NWBHDF5IO, NWBFile, ProcessingModule, TimeSeries
from hdmf.common import VectorData, VectorIndex
from pynwb.file import Subject
from pynwb.misc import Units

from nlbfab.layout import TRUTH_FILE, dataset_dir, hidden_test_file
from nlbfab.splits import Dataset
from nlbfab.synth import VARIABILITIES, SessionFile, Truth, generate, poisson_spike_times

SPECIES = {"Haydn": "Macaca mulatta", "Han": "Macaca mulatta"}


def _add_trials(nwbfile: NWBFile, trials) -> None:
    fields = [c for c in trials if c not in ("start", "stop") and not c.startswith("_")]
    for name in fields:
        ragged = isinstance(trials[name].iloc[0], np.ndarray)
        nwbfile.add_trial_column(name=name, description=f"synthetic {name}", index=ragged)
    for _, row in trials.iterrows():
        values = {}
        for name in fields:
            value = row[name]
            values[name] = value.tolist() if isinstance(value, np.ndarray) else value
            if name.endswith("_time"):
                values[name] = value / 1000
        nwbfile.add_trial(start_time=row["start"] / 1000, stop_time=row["stop"] / 1000, **values)


def _units_table(spike_times: list[np.ndarray], heldout: np.ndarray, end_s: float) -> Units:
    """The units table, built from whole arrays: adding millions of spike times unit by unit
    through ``add_unit`` makes hdmf convert them element by element (minutes at full scale)."""
    n = len(spike_times)
    times = VectorData(name="spike_times", description="spike times (s)", data=np.concatenate(spike_times))
    intervals = VectorData(name="obs_intervals", description="observation intervals (s)",
                           data=np.tile([[0.0, end_s]], (n, 1)))
    return Units(
        name="units", description="synthetic units", id=np.arange(n),
        columns=[
            times, VectorIndex(name="spike_times_index", target=times,
                               data=np.cumsum([len(t) for t in spike_times])),
            intervals, VectorIndex(name="obs_intervals_index", target=intervals, data=np.arange(1, n + 1)),
            VectorData(name="heldout", description="whether the unit is held out (co-smoothing target)",
                       data=np.asarray(heldout, bool)),
        ])


def _add_behavior(nwbfile: NWBFile, behavior) -> None:
    module = ProcessingModule(name="behavior", description="synthetic behaviour")
    nwbfile.add_processing_module(module)
    for name, (timestamps, data, columns) in behavior.items():
        module.add(TimeSeries(name=name, data=data, timestamps=timestamps, unit="mm/s" if "vel" in name else "mm",
                              comments=f"columns=[{','.join(columns)}]", description=f"synthetic {name}"))


def write_nwb(path: Path, dataset: Dataset, which: str, session: SessionFile, truth: Truth, rng,
              hidden_rng=None) -> None:
    """One NWB file: the train file holds all units (heldout flagged) and behaviour; the test
    file holds held-in units only and no behaviour, as on DANDI. With ``hidden_rng``, the test
    file as EvalAI holds it instead: the held-out units too (drawn from ``hidden_rng`` after the
    held-in ones, so that ``rng`` in the state it has for DANDI's copy gives the same held-in
    spikes), the behaviour and every trial field. Written atomically."""
    units = np.flatnonzero(~truth.heldout) if which == "test" else np.arange(len(truth.heldout))
    nwbfile = NWBFile(
        session_description=f"synthetic {dataset.name} ({which}), made by nlbfab-synth",
        identifier=str(uuid.UUID(int=rng.integers(0, 2**63))),
        session_start_time=datetime(2021, 1, 1, tzinfo=timezone.utc),
        subject=Subject(subject_id=dataset.subject, species=SPECIES.get(dataset.subject, "Macaca mulatta")),
    )
    whole = hidden_rng is not None
    _add_trials(nwbfile, session.hidden.trials if whole else session.trials)
    end_s = len(session.latents) / 1000
    spike_times = poisson_spike_times(session.latents, truth, units, rng)
    if whole:
        heldout = np.flatnonzero(truth.heldout)
        spike_times += poisson_spike_times(session.latents, truth, heldout, hidden_rng)
        units = np.concatenate([units, heldout])
    nwbfile.units = _units_table(spike_times, truth.heldout[units], end_s)
    behavior = session.hidden.behavior if whole else session.behavior
    if behavior:
        _add_behavior(nwbfile, behavior)
    partial = path.with_name(f".{path.name}")  # hidden: NWBDataset's '*.nwb' glob skips it
    with NWBHDF5IO(str(partial), "w") as io:
        io.write(nwbfile)
    os.replace(partial, path)


def write_truth(path: Path, files: dict[str, SessionFile], truth: Truth, scale: str, seed: int,
                variability: str = "low") -> None:
    """The ground truth beside the NWB files: per file its 1 ms latents and trial starts, and the
    loadings and ceiling that turn latents into every unit's rate (see ``nlbfab.oracle``); its
    attributes say how it was made (scale, seed, variability and the variability's parameters)."""
    partial = path.with_name(path.name + ".partial")
    with h5py.File(partial, "w") as h5:
        h5.attrs.update(scale=scale, seed=seed, variability=variability, lag_ms=truth.lag_ms,
                        ceiling_per_ms=truth.ceiling)
        if VARIABILITIES[variability] is not None:
            h5.attrs["variability_params"] = json.dumps(asdict(VARIABILITIES[variability]))
        for name in ("loadings", "bias", "heldout", "readout"):
            h5[name] = getattr(truth, name)
        for which, session in files.items():
            group = h5.create_group(which)
            group.create_dataset("latents", data=session.latents, compression="gzip", compression_opts=1)
            group["trial_start_ms"] = session.trials["start"].to_numpy()
    os.replace(partial, path)


def _intact(path: Path) -> bool:
    """Whether ``path`` is an HDF5 file that opens: a file cut short by a full disk or a copy
    that stopped is no longer one, and must be made again rather than skipped."""
    try:
        with h5py.File(path, "r"):
            return True
    except OSError:
        return False


def existing_synthesis(data_home: Path, dataset: Dataset) -> tuple[str, int, str] | None:
    """(scale, seed, variability) of a complete synthetic dataset already in ``data_home``, else
    None: a file missing or damaged (see ``_intact``) leaves it to be made again. Truth files
    written before ``variability`` existed hold low-variability data; one made with parameters
    other than today's for its variability says so (``"realistic, earlier parameters"``), so
    that it is made again rather than taken for today's."""
    folder = dataset_dir(data_home, dataset)
    files = (folder / dataset.file_name("train"), folder / dataset.file_name("test"),
             hidden_test_file(data_home, dataset), folder / TRUTH_FILE)
    if not all(_intact(path) for path in files):
        return None
    with h5py.File(folder / TRUTH_FILE, "r") as h5:
        variability = str(h5.attrs.get("variability", "low"))
        made_with = json.loads(h5.attrs.get("variability_params", "null"))
        today = VARIABILITIES.get(variability)
        if made_with != (today and asdict(today)):
            variability += ", earlier parameters"
        return str(h5.attrs["scale"]), int(h5.attrs["seed"]), variability


def synthesize(dataset: Dataset, data_home: Path, scale: str = "tiny", seed: int = 0,
               variability: str = "low") -> Path:
    """Write ``dataset``'s train and test NWB files and its truth under ``data_home``.
    ``variability``: ``low`` or ``realistic`` (see ``nlbfab.synth.Variability``).

    Returns the dataset folder. Files appear only when complete (temporary name, then rename).
    """
    folder = dataset_dir(data_home, dataset)
    folder.mkdir(parents=True, exist_ok=True)
    files, truth = generate(dataset, scale, seed, variability)
    # the truth file, written last, marks the set complete: without it (an interrupted run) the
    # folder is not taken for a finished dataset of the settings its old truth file named
    (folder / TRUTH_FILE).unlink(missing_ok=True)
    rng = np.random.default_rng([seed, sum(map(ord, dataset.name)), 1])
    for which, session in files.items():
        if which == "test":  # EvalAI's copy first, from a copy of the state DANDI's copy is drawn in
            hidden = hidden_test_file(data_home, dataset)
            hidden.parent.mkdir(exist_ok=True)
            write_nwb(hidden, dataset, which, session, truth, copy.deepcopy(rng),
                      hidden_rng=np.random.default_rng([seed, sum(map(ord, dataset.name)), 5]))
        write_nwb(folder / dataset.file_name(which), dataset, which, session, truth, rng)
    write_truth(folder / TRUTH_FILE, files, truth, scale, seed, variability)
    return folder
