"""The native engine makes nlb_tools' tensors: every array of every file of the 28 splits, the
edge cases of real NWB files that the synthetic data lacks, and the same oracle scores."""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from pynwb import NWBHDF5IO, TimeSeries
from pynwb.behavior import Position, SpatialSeries

from nlbfab import cli, prep
from nlbfab.layout import dataset_dir
from nlbfab.native.session import Intervals
from nlbfab.oracle import oracle_rates
from nlbfab.scoring import score
from nlbfab.splits import ALL_SPLITS, DATASETS, splits_of
from nlbfab.submission import write_rates
from tests.conftest import homes_with, run_cli


def _arrays(path) -> dict[str, tuple[np.dtype, np.ndarray]]:
    found = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, item: found.update({name: (item.dtype, item[()])})
                      if isinstance(item, h5py.Dataset) else None)
    return found


def assert_same_splits(native_home, reference_home, splits):
    """Same files, keys, dtypes and shapes; spike counts, masks, indices and jitter equal, other
    floats (behaviour, PSTHs) to 1e-5 relative, NaN where the reference has NaN."""
    for split in splits:
        names = sorted(p.name for p in (reference_home / split.name).iterdir())
        assert sorted(p.name for p in (native_home / split.name).iterdir()) == names, split.name
        for name in [n for n in names if n.endswith(".h5")]:
            ours, theirs = _arrays(native_home / split.name / name), _arrays(reference_home / split.name / name)
            assert sorted(ours) == sorted(theirs), (split.name, name)
            for key, (dtype, expected) in theirs.items():
                where = f"{split.name}/{name}:{key}"
                assert ours[key][0] == dtype, where
                got = ours[key][1]
                if expected.dtype == object:  # train_cond_idx, eval_cond_idx: one index array per condition
                    assert len(got) == len(expected) and all(map(np.array_equal, got, expected)), where
                elif np.issubdtype(expected.dtype, np.floating) and "spikes" not in key:
                    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=0, equal_nan=True, err_msg=where)
                else:
                    assert np.array_equal(got, expected, equal_nan=expected.dtype.kind == "f"), where


@pytest.fixture(scope="session")
def nlb_tools_prepared(synthetic, tmp_path_factory):
    """All 28 splits made with ``--engine nlb_tools`` (the ``prepared`` fixture is native's)."""
    home = tmp_path_factory.mktemp("prep-nlb_tools")
    prep.prepare_splits(list(ALL_SPLITS), homes_with(prep=home), report=lambda line: None, engine="nlb_tools")
    return home


@pytest.mark.parametrize("name", DATASETS)
def test_native_tensors_equal_nlb_tools(prepared, nlb_tools_prepared, name):
    assert_same_splits(prepared, nlb_tools_prepared, splits_of(DATASETS[name]))


@pytest.mark.parametrize("split", [s for s in ALL_SPLITS if s.phase == "val" and s.bin_ms == 20], ids=str)
def test_the_oracle_scores_the_same_against_either_engines_target(prepared, nlb_tools_prepared, synthetic, tmp_path,
                                                                   split):
    rates = oracle_rates(synthetic, split)
    submission = write_rates(tmp_path / "oracle.h5", split.group, split.phase, rates)
    native = score(prepared / split.name / "eval_target.h5", submission, split)
    reference = score(nlb_tools_prepared / split.name / "eval_target.h5", submission, split)
    assert native.keys() == reference.keys() and "co-bps" in native
    for metric, value in reference.items():
        assert native[metric] == pytest.approx(value, rel=1e-5, abs=1e-6), metric


# --- what real NWB files have and the synthetic ones lack, on copies of the tiny datasets ---

def _trials(h5) -> dict[str, np.ndarray]:
    return {k: h5["intervals/trials"][k][()] for k in ("start_time", "stop_time", "split", "move_onset_time",
                                                       "go_time") if k in h5["intervals/trials"]}


def _set_ragged(h5, column: str, unit: int, values) -> None:
    """Give one unit these values of a ragged units column (``obs_intervals``, ``spike_times``):
    the column and its index are rewritten."""
    units = h5["units"]
    data, index = units[column][()], units[f"{column}_index"][()]
    starts = np.r_[0, index[:-1]]
    pieces = [np.asarray(values, float) if u == unit else data[starts[u]:index[u]] for u in range(len(index))]
    attrs = {k: dict(units[k].attrs) for k in (column, f"{column}_index")}
    del units[column], units[f"{column}_index"]
    written = units.create_dataset(column, data=np.concatenate(pieces))
    written.attrs.update(attrs[column])
    ends = units.create_dataset(f"{column}_index", data=np.cumsum([len(p) for p in pieces]).astype(index.dtype))
    ends.attrs.update({**attrs[f"{column}_index"], "target": written.ref})


def _rewrite(dataset: h5py.Dataset, values: np.ndarray) -> None:
    """Replace a dataset's values, dtype included, keeping its attributes."""
    parent, name, attrs = dataset.parent, dataset.name.split("/")[-1], dict(dataset.attrs)
    del parent[name]
    parent.create_dataset(name, data=values).attrs.update(attrs)


def _obs_gaps_and_overlap(folder, dataset):
    """mc_maze: the first held-in unit's obs_intervals (hence all held-in units') leave a gap just
    before a trial whose window starts within the PSTH kernel's reach, the first held-out unit's
    start after the first trial's start and end before the last trial's end; in the test file
    the held-in units' stop inside the first and last test trials' windows (NaN bins, partial
    bins); and one trial's behaviour window is cut short by the start of the trial after next."""
    with h5py.File(folder / dataset.file_name("train"), "r+") as h5:
        t = _trials(h5)
        end = h5["units/obs_intervals"][0, 1]
        scored = np.flatnonzero(np.isin(t["split"], [b"train", b"val"]) & (np.arange(len(t["split"])) > 0))
        j = scored[np.argmin((t["move_onset_time"] - t["start_time"])[scored])]  # its PSTH window starts earliest
        _set_ragged(h5, "obs_intervals", 0, [(0.0, t["start_time"][j] - 0.0796), (t["start_time"][j] - 0.0305, end)])
        heldout = int(np.flatnonzero(h5["units/heldout"][()])[0])
        _set_ragged(h5, "obs_intervals", heldout, [(t["start_time"][0] + 0.0502, t["stop_time"][-1] - 0.1003)])
        train = t["split"] == b"train"
        k = np.flatnonzero(train[:-2] & train[1:-1])[3]
        starts = h5["intervals/trials/start_time"]
        starts[k + 2] = t["move_onset_time"][k] + 0.5  # after its spike window, before its behaviour window ends
    with h5py.File(folder / dataset.file_name("test"), "r+") as h5:
        t = _trials(h5)
        _set_ragged(h5, "obs_intervals", 0, [(t["move_onset_time"][0] - 0.1234, t["move_onset_time"][-1] + 0.2002)])


def _behaviour_gaps_and_extra_series(folder, dataset):
    """mc_rtt (continuous behaviour): finger velocity NaN between the windows of long trials, which
    interpolation bridges within the filter's reach; a target_pos series; a series in a container."""
    path = folder / dataset.file_name("train")
    with h5py.File(path, "r+") as h5:
        t = _trials(h5)
        rows = np.round(h5["processing/behavior/finger_vel/timestamps"][()] * 1000).astype(int)
        velocity = h5["processing/behavior/finger_vel/data"][()]
        for start, stop in zip(t["start_time"], t["stop_time"]):
            if stop - start > 0.85:
                velocity[(rows >= round(start * 1000) + 820) & (rows < round(stop * 1000) - 10), 1] = np.nan
        h5["processing/behavior/finger_vel/data"][...] = velocity
    with NWBHDF5IO(str(path), "a") as io:
        nwbfile = io.read()
        timestamps = nwbfile.processing["behavior"]["finger_pos"].timestamps[()]
        behaviour = nwbfile.processing["behavior"]
        behaviour.add(TimeSeries(name="target_pos", data=np.cumsum(np.ones((len(timestamps), 2)), axis=0),
                                 timestamps=timestamps, unit="mm", comments="columns=[x,y]"))
        behaviour.add(Position(spatial_series=SpatialSeries(name="cursor", data=np.ones((len(timestamps), 2)),
                                                            timestamps=timestamps, reference_frame="screen")))
        io.write(nwbfile)


def _float64_renamed_behaviour_with_nans(folder, dataset):
    """area2_bump: hand velocity stored as float64 under channels named y,x (nlb_tools sorts them),
    NaN in the 20 ms before some train trials' windows, which only the behaviour window reaches."""
    with h5py.File(folder / dataset.file_name("train"), "r+") as h5:
        t = _trials(h5)
        series = h5["processing/behavior/hand_vel"]
        rows = np.round(series["timestamps"][()] * 1000).astype(int)
        velocity = series["data"][()].astype(np.float64)
        for move in t["move_onset_time"][t["split"] == b"train"][::3]:
            velocity[(rows >= round(move * 1000) - 120) & (rows < round(move * 1000) - 100)] = np.nan
        _rewrite(series["data"], velocity)
        series.attrs["comments"] = "columns=[y,x]"


def _series_with_nans_in_every_window(folder, dataset):
    """dmfc_rsg: an eye position recorded through the train file except 20 ms before every go
    cue (those bins are dropped from every window that allows no NaN), a series in a container,
    and one off the 1 ms grid (nlb_tools drops it)."""
    path = folder / dataset.file_name("train")
    with h5py.File(path, "r") as h5:
        t = _trials(h5)
        n_rows = int(round(h5["units/obs_intervals"][()].max() * 1000))
    eye = np.ones((n_rows, 2))
    for go in t["go_time"]:
        eye[round(go * 1000) - 100:round(go * 1000) - 80] = np.nan
    with NWBHDF5IO(str(path), "a") as io:
        nwbfile = io.read()
        nwbfile.add_acquisition(TimeSeries(name="eye_pos", data=eye, rate=1000.0, starting_time=0.0, unit="deg"))
        nwbfile.add_acquisition(Position(spatial_series=SpatialSeries(
            name="hand", data=np.zeros((n_rows, 2)), rate=1000.0, starting_time=0.0, reference_frame="room")))
        nwbfile.add_acquisition(TimeSeries(name="pupil", data=np.ones(n_rows - 1), unit="mm",
                                           timestamps=(np.arange(n_rows - 1) + 0.5) / 1000))
        io.write(nwbfile)


def _units_without_spikes(folder, dataset):
    """mc_maze_small: units that never fire in a file (a sparse unit in the test file's short
    segments): the first held-in unit of both files, whose obs_intervals set the NaN bins, and a
    held-out unit of the train file."""
    for which in ("train", "test"):
        with h5py.File(folder / dataset.file_name(which), "r+") as h5:
            _set_ragged(h5, "spike_times", 0, np.empty(0))
            if which == "train":
                _set_ragged(h5, "spike_times", int(np.flatnonzero(h5["units/heldout"][()])[-1]), np.empty(0))


EDITS = {"mc_maze": _obs_gaps_and_overlap, "mc_maze_small": _units_without_spikes,
         "mc_rtt": _behaviour_gaps_and_extra_series, "area2_bump": _float64_renamed_behaviour_with_nans,
         "dmfc_rsg": _series_with_nans_in_every_window}


@pytest.mark.parametrize("name", EDITS)
def test_real_data_edges_give_nlb_tools_tensors(synthetic, tmp_path, name):
    dataset = DATASETS[name]
    data = tmp_path / "dandi"
    shutil.copytree(dataset_dir(synthetic, dataset), dataset_dir(data, dataset))
    EDITS[name](dataset_dir(data, dataset), dataset)
    for engine in ("native", "nlb_tools"):
        prep.prepare_splits(splits_of(dataset), homes_with(data=data, prep=tmp_path / engine), report=lambda line: None,
                            engine=engine)
    assert_same_splits(tmp_path / "native", tmp_path / "nlb_tools", splits_of(dataset))


def test_the_edges_show_in_the_tensors(synthetic, tmp_path):
    """The edits above reach the tensors (so the parity above tests the rules): NaN and partial
    bins where held-in units were not observed, behaviour cut short by an overlap, bins dropped
    where another series is NaN."""
    for name in ("mc_maze", "dmfc_rsg"):
        dataset = DATASETS[name]
        shutil.copytree(dataset_dir(synthetic, dataset), dataset_dir(tmp_path, dataset))
        EDITS[name](dataset_dir(tmp_path, dataset), dataset)
    home = tmp_path / "prep"
    splits = [s for s in ALL_SPLITS if s.dataset.name in ("mc_maze", "dmfc_rsg") and s.bin_ms == 20]
    prep.prepare_splits(splits, homes_with(data=tmp_path, prep=home), report=lambda line: None)
    test_input = _arrays(home / "mc_maze-20ms-test" / "eval_input.h5")["eval_spikes_heldin"][1]
    assert np.isnan(test_input[0, 0]).all() and np.isnan(test_input[-1, -1]).all()
    assert not np.isnan(test_input[1:-1]).any()
    behaviour = _arrays(home / "mc_maze-20ms-val" / "train_input.h5")["train_behavior"][1]
    assert np.isnan(behaviour).any(axis=(1, 2)).sum() == 1  # one trial's window, cut short, NaN-padded
    official = _arrays(home / "dmfc_rsg-20ms-val" / "eval_target.h5")["dmfc_rsg_20/eval_spikes_heldout"][1]
    train = _arrays(home / "dmfc_rsg-20ms-val" / "train_input.h5")["train_spikes_heldin"][1]
    assert train.shape[1] == 1500 // 20 - 1 and official.shape[1] == 1500 // 20


def test_intervals_union_intersection_and_membership():
    a = Intervals.union([5, 0, 12, 3], [8, 4, 15, 6])  # [0, 4) and [3, 6) touch: [0, 6)
    assert a.starts.tolist() == [0, 12] and a.stops.tolist() == [8, 15]
    b = Intervals.of_rows(np.array([2, 3, 4, 13, 20]))
    assert (a & b) == Intervals(np.array([2, 13]), np.array([5, 14]))
    assert a.contains(np.array([-1, 0, 7, 8, 12, 15])).tolist() == [False, True, True, False, True, False]


def test_engine_option(homes, synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("PREP_HOME", str(tmp_path))
    result = run_cli(cli.prep, "--split", "mc_maze_small-20ms-test", "--engine", "nlb_tools")
    assert result.exit_code == 0 and "(nlb_tools engine)" in result.output
    result = run_cli(cli.prep, "--split", "mc_maze_small-20ms-test", "--engine", "pandas")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: Invalid value for '--engine': 'pandas' is not one of 'native', 'nlb_tools'.")


def test_a_damaged_nwb_file_or_truth_is_one_line_naming_it(prepared, synthetic, tmp_path, monkeypatch):
    dataset = DATASETS["mc_rtt"]
    copy = dataset_dir(tmp_path, dataset)
    shutil.copytree(dataset_dir(synthetic, dataset), copy)
    monkeypatch.setenv("DATA_HOME", str(tmp_path))
    monkeypatch.setenv("RUNS_HOME", str(tmp_path / "runs"))
    truth = copy / "synthetic_truth.h5"
    truth.write_bytes(truth.read_bytes()[:1000])
    result = run_cli(cli.baseline, "--method", "oracle", "--split", "mc_rtt-20ms-val")
    assert result.exit_code == 2 and result.stderr.startswith(f"error: cannot read {truth}") and "nlbfab-synth --force" in result.stderr
    monkeypatch.setenv("PREP_HOME", str(tmp_path / "prep"))
    train = next(copy.glob("*train*.nwb"))
    train.write_bytes(train.read_bytes()[:100_000])
    result = run_cli(cli.prep, "--split", "mc_rtt-20ms-val")
    assert result.exit_code == 2 and f"error: cannot read {train}" in result.stderr and "it is damaged" in result.stderr
    lines = result.stderr.strip().splitlines()  # after prep's progress lines
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, result.stderr
    assert not (tmp_path / "prep" / "mc_rtt-20ms-val").exists()
