"""The synthetic datasets look like DANDI's NLB files to pynwb and nlb_tools."""
from __future__ import annotations

import json
from dataclasses import replace

import h5py
import numpy as np
import pytest
from pynwb import NWBHDF5IO

from nlbfab import cli
from nlbfab.oracle import read_truth
from nlbfab.splits import DATASETS
from nlbfab.synth import (CEILING_SHARPNESS, LATENT_DIM, POSTURE_MS, VARIABILITIES, Fluctuation, counts, generate,
                          rate_law)
from nlbfab.synth_nwb import existing_synthesis, synthesize
from nlbfab.layout import TRUTH_FILE, dataset_dir, hidden_test_file
from tests.conftest import run_cli


def read(path):
    io = NWBHDF5IO(str(path), "r")
    return io, io.read()


@pytest.mark.parametrize("name", list(DATASETS))
def test_files_have_the_dandi_layout(synthetic, name):
    dataset = DATASETS[name]
    n = counts(dataset, "tiny")
    folder = dataset_dir(synthetic, dataset)
    assert sorted(p.name for p in folder.glob("*.nwb")) == sorted(
        [dataset.file_name("train"), dataset.file_name("test")])
    assert (folder / TRUTH_FILE).is_file()

    io, train = read(folder / dataset.file_name("train"))
    with io:
        units = train.units.to_dataframe()
        trials = train.trials.to_dataframe()
        assert units["heldout"].sum() == n.heldout and (~units["heldout"]).sum() == n.heldin
        assert all(len(iv) >= 1 for iv in units["obs_intervals"])
        assert list(trials.index) == list(range(len(trials)))
        assert trials["split"].value_counts().to_dict() == {"train": n.train, "val": n.val, "none": n.none}
        behavior = train.processing["behavior"].data_interfaces if dataset.behavior else {}
        if dataset.behavior:
            series = behavior[dataset.behavior]
            assert series.comments == "columns=[x,y]"
            ms = series.timestamps[()] * 1000
            assert np.allclose(ms, np.round(ms))  # on the 1 ms grid, or nlb_tools drops it
        else:
            assert "behavior" not in train.processing

    io, test = read(folder / dataset.file_name("test"))
    with io:
        units = test.units.to_dataframe()
        trials = test.trials.to_dataframe()
        assert len(units) == n.heldin and not units["heldout"].any()
        assert set(trials["split"]) == {"test"} and len(trials) == n.test
        assert "behavior" not in test.processing
        assert all(c.endswith("_time") or c == "split" for c in trials.columns)


def test_each_dataset_keeps_its_own_trial_fields(synthetic):
    expected = {
        "mc_maze": {"move_onset_time", "trial_type", "trial_version", "maze_id", "success", "target_on_time",
                    "go_cue_time", "rt", "delay", "num_targets", "target_pos", "num_barriers", "barrier_pos",
                    "active_target"},
        "area2_bump": {"move_onset_time", "cond_dir", "ctr_hold_bump", "bump_time"},
        "dmfc_rsg": {"set_time", "go_time", "is_eye", "theta", "is_short", "ts", "tp", "is_outlier"},
        "mc_rtt": {"target_pos"},
    }
    for name, fields in expected.items():
        io, nwb = read(dataset_dir(synthetic, DATASETS[name]) / DATASETS[name].file_name("train"))
        with io:
            assert fields <= set(nwb.trials.colnames), name


def test_conditions_have_unequal_trial_counts(synthetic):
    io, nwb = read(dataset_dir(synthetic, DATASETS["mc_maze"]) / DATASETS["mc_maze"].file_name("train"))
    with io:
        per_condition = nwb.trials.to_dataframe().groupby(["trial_type", "trial_version"]).size()
    assert per_condition.nunique() > 1


def test_behaviour_of_trial_only_datasets_covers_only_trials(synthetic):
    dataset = DATASETS["mc_maze"]
    io, nwb = read(dataset_dir(synthetic, dataset) / dataset.file_name("train"))
    with io:
        ms = nwb.processing["behavior"]["hand_vel"].timestamps[()]
        trials = nwb.trials.to_dataframe()
        gaps = trials["start_time"].to_numpy()[1:] - trials["stop_time"].to_numpy()[:-1]
        assert gaps.min() > 0.05
        assert not np.any((ms > trials["stop_time"].iloc[0] + 0.01) & (ms < trials["start_time"].iloc[1] - 0.01))
        # the session ends where the last trial ends: the case that trips an unsorted load
        end = max(iv[-1][-1] for iv in nwb.units.to_dataframe()["obs_intervals"])
        assert end == pytest.approx(np.ceil(trials["stop_time"].iloc[-1] * 1000) / 1000)


def test_generation_is_deterministic_in_the_seed():
    dataset = DATASETS["dmfc_rsg"]
    first, _ = generate(dataset, "tiny", seed=3)
    again, _ = generate(dataset, "tiny", seed=3)
    other, _ = generate(dataset, "tiny", seed=4)
    assert np.array_equal(first["train"].latents, again["train"].latents)
    assert first["train"].trials.drop(columns=["target_pos"], errors="ignore").equals(
        again["train"].trials.drop(columns=["target_pos"], errors="ignore"))
    assert not np.array_equal(first["train"].latents, other["train"].latents)


def test_full_scale_uses_the_real_counts():
    for dataset in DATASETS.values():
        n = counts(dataset, "full")
        assert (n.heldin, n.heldout, n.train, n.val, n.test) == (
            dataset.heldin, dataset.heldout, dataset.train, dataset.val, dataset.test)


def test_truth_reproduces_the_spike_rates(synthetic):
    """Mean spike counts over the session match the rates the truth file implies."""
    dataset = DATASETS["mc_rtt"]
    folder = dataset_dir(synthetic, dataset)
    with h5py.File(folder / TRUTH_FILE) as h5:
        latents, loadings, bias = h5["train/latents"][()], h5["loadings"][()], h5["bias"][()]
    expected = np.exp(latents @ loadings + bias).sum(axis=0)  # spikes per unit over the session
    io, nwb = read(folder / dataset.file_name("train"))
    with io:
        observed = np.array([len(t) for t in nwb.units.to_dataframe()["spike_times"]])
    assert np.allclose(observed, expected, rtol=0.25)
    assert np.corrcoef(observed, expected)[0, 1] > 0.95


# Fingerprints of the low-variability data as nlbfab made it before --variability existed
# (--scale tiny, seed 0): (sum, sum of |x|, sum of x weighted by a ramp) of each array, the
# spike counts of the train and test files, and the sum of the trial starts (ms). Sums, not
# hashes, so that the last bits of exp/sin on another CPU do not matter; a new numpy whose
# random streams differ would change the data, and this test says so.
LOW_TINY_SEED_0 = {
    "mc_maze": {
        "truth": (-49.4365324, 217.984702, -15.8947554),
        "train": (50280.3151, 190345.756, -802.993676),
        "test": (11191.2172, 38984.2905, -2414.9299),
        "behavior": (6804006.69, 8209574.41, -2420269.18),
        "spikes": (20101, 3114),
        "starts": 3052438,
    },
    "area2_bump": {
        "truth": (-10.227007, 197.259999, -1.94710047),
        "train": (9582.29607, 125533.24, -2886.07906),
        "test": (-2014.07776, 22196.5819, 1571.22271),
        "behavior": (-3555962.33, 13543071.6, -32568.1479),
        "spikes": (24875, 3911),
        "starts": 2605111,
    },
    "dmfc_rsg": {
        "truth": (-51.27142, 423.903783, -26.6993273),
        "train": (72959.0972, 507299.512, -15532.2112),
        "test": (34456.2253, 97134.5069, -11224.4405),
        "spikes": (27442, 4198),
        "starts": 6148012,
    },
    "mc_rtt": {
        "truth": (-152.504154, 442.158086, -115.64276),
        "train": (2655.43344, 180130.111, -1662.28588),
        "test": (-743.278239, 42346.9541, 2112.76004),
        "behavior": (-13683420.7, 16537836.8, 6026327.05),
        "spikes": (10248, 1737),
        "starts": 1565888,
    },
}


def fingerprint(x) -> np.ndarray:
    x = np.asarray(x, np.float64).ravel()
    return np.array([x.sum(), np.abs(x).sum(), x @ np.linspace(-1, 1, x.size)])


def spike_count(path) -> int:
    io, nwb = read(path)
    with io:
        return len(nwb.units.spike_times[:])


@pytest.mark.parametrize("name", list(LOW_TINY_SEED_0))
def test_low_variability_is_the_data_made_before_variability_existed(synthetic, name):
    expected = LOW_TINY_SEED_0[name]
    dataset = DATASETS[name]
    files, truth = generate(dataset, "tiny", seed=0, variability="low")
    arrays = {"truth": np.concatenate([truth.loadings.ravel(), truth.bias, truth.readout.ravel()]),
              "train": files["train"].latents, "test": files["test"].latents}
    if dataset.behavior:
        behavior = files["train"].behavior
        arrays["behavior"] = np.concatenate([behavior[k][1].ravel() for k in sorted(behavior)])
    for key, x in arrays.items():
        assert np.allclose(fingerprint(x), expected[key], rtol=1e-6, atol=1e-6 * expected[key][1]), key
    assert int(files["train"].trials["start"].sum()) == expected["starts"]
    assert truth.loadings.shape[0] == LATENT_DIM
    # the session fixture ran plain 'nlbfab-synth --all --scale tiny': low is the default
    folder = dataset_dir(synthetic, dataset)
    assert tuple(spike_count(folder / dataset.file_name(w)) for w in ("train", "test")) == expected["spikes"]
    assert existing_synthesis(synthetic, dataset) == ("tiny", 0, "low")


def without_fluctuation(monkeypatch, dataset, seed):
    """``dataset`` made as ``realistic`` with its slow noise and pulses set to nothing: the low
    latents plus the posture."""
    monkeypatch.setitem(VARIABILITIES, "quiet", replace(VARIABILITIES["realistic"], slow=0.0, pulse=0.0))
    return generate(dataset, "tiny", seed=seed, variability="quiet")[0]


@pytest.mark.parametrize("name", ["mc_maze", "area2_bump", "dmfc_rsg", "mc_rtt"])
def test_realistic_generation_is_deterministic_in_the_seed(name, monkeypatch):
    dataset = DATASETS[name]
    first, truth = generate(dataset, "tiny", seed=3, variability="realistic")
    again, truth_again = generate(dataset, "tiny", seed=3, variability="realistic")
    other, _ = generate(dataset, "tiny", seed=4, variability="realistic")
    low, low_truth = generate(dataset, "tiny", seed=3, variability="low")
    quiet = without_fluctuation(monkeypatch, dataset, 3)
    for which in ("train", "test"):
        assert np.array_equal(first[which].latents, again[which].latents)
        assert not np.array_equal(first[which].latents, other[which].latents)
        # its own random stream: the same trials and units as low
        assert first[which].trials.drop(columns=["target_pos", "barrier_pos"], errors="ignore").equals(
            low[which].trials.drop(columns=["target_pos", "barrier_pos"], errors="ignore"))
    v = VARIABILITIES["realistic"]
    assert np.array_equal(truth.loadings, truth_again.loadings)
    assert np.array_equal(truth.loadings, low_truth.loadings)
    assert np.array_equal(truth.readout, low_truth.readout)
    assert np.allclose(np.exp(truth.bias - low_truth.bias), v.rate_scale)
    # the variability (realistic minus quiet latents) spans input_dims directions, the same in both files
    added = np.concatenate([first[w].latents - quiet[w].latents for w in ("train", "test")])
    singular = np.linalg.svd(added, compute_uv=False)
    assert singular[v.input_dims - 1] > 1e3 * singular[v.input_dims] and v.input_dims < LATENT_DIM


@pytest.mark.parametrize("name", ["mc_maze", "mc_maze_small", "area2_bump"])
def test_realistic_maze_latents_settle_into_a_condition_posture_after_movement_onset(name, monkeypatch):
    dataset = DATASETS[name]
    low, _ = generate(dataset, "tiny", seed=3, variability="low")
    quiet = without_fluctuation(monkeypatch, dataset, 3)
    posture = quiet["train"].latents - low["train"].latents
    if not name.startswith("mc_maze"):
        assert not posture.any()
        return
    assert not posture[:, 4:].any()  # the preparatory dims only: the velocity readout never sees it
    trials = low["train"].trials
    starts, moves = trials["start"].to_numpy(int), trials["move_onset_time"].to_numpy(int)
    settled = np.stack([posture[move + 600, :4] for move in moves])
    for start, move in zip(starts, moves):
        assert not posture[start:move + 1].any()
    expected = VARIABILITIES["realistic"].posture * (1 - np.exp(-600 / POSTURE_MS))
    assert np.allclose(np.linalg.norm(settled, axis=1), expected, rtol=1e-4)
    cond = trials["_cond"].to_numpy()
    assert all(np.allclose(settled[cond == c], settled[cond == c][0], atol=1e-5) for c in np.unique(cond))
    assert len(np.unique(settled.round(4), axis=0)) == len(np.unique(cond))  # a posture per condition


@pytest.mark.parametrize("ring_hz", [0.0, 8.0])
def test_a_pulse_has_the_alpha_kernels_size_and_turns_in_its_planes_at_the_ring_frequency(ring_hz):
    v = replace(VARIABILITIES["realistic"], ring_hz=ring_hz)
    kicks = np.zeros((300, 4))
    kicks[10] = [1.0, 0.0, 0.0, 2.0]  # planes 1 + 0i and 0 + 2i
    pulses = Fluctuation(np.zeros_like(kicks), kicks, np.eye(4, LATENT_DIM), v, 1.0, np.sqrt(5)).pulses
    m = np.arange(300) - 10  # ms since the kick
    alpha = np.where(m > 0, m / v.pulse_ms * np.exp(1 - m / v.pulse_ms), 0.0)
    np.testing.assert_allclose(np.linalg.norm(pulses, axis=1), np.sqrt(5) * alpha, atol=1e-12)
    after = m > 0
    turn = np.exp(2j * np.pi * ring_hz / 1000 * m[after])
    np.testing.assert_allclose((pulses[after, 0] + 1j * pulses[after, 1]) / alpha[after], turn, atol=1e-9)
    np.testing.assert_allclose((pulses[after, 2] + 1j * pulses[after, 3]) / alpha[after], 2j * turn, atol=1e-9)


def test_the_kept_fluctuation_is_what_the_latents_got_and_continues_into_futures(monkeypatch):
    dataset = DATASETS["mc_maze"]
    files, _ = generate(dataset, "tiny", seed=3, variability="realistic", keep_fluctuation=True)
    quiet = without_fluctuation(monkeypatch, dataset, 3)
    assert generate(dataset, "tiny", seed=3, variability="realistic")[0]["train"].fluctuation is None
    fluctuation = files["train"].fluctuation
    added = fluctuation.latents()
    assert np.allclose(added, files["train"].latents - quiet["train"].latents, atol=1e-5)
    # continued with the file's own innovations and kicks, it is the file's fluctuation again
    v, start, steps = fluctuation.variability, 5000, 300
    a = np.exp(-1 / v.slow_ms)
    span = slice(start, start + steps)
    innovations = (fluctuation.slow[span] - a * fluctuation.slow[start - 1:start + steps - 1]) \
        / (np.sqrt(1 - a * a) * fluctuation.slow_sd)
    again = fluctuation.continued(start, innovations[None], fluctuation.kicks[span][None])
    assert np.allclose(again[0], added[span], atol=1e-5)
    # futures start where the past leaves off and spread as new noise and kicks come in
    futures = fluctuation.futures(start, steps, 500, np.random.default_rng(0))
    assert futures.shape == (500, steps, LATENT_DIM)
    spread = futures.std(0).mean(-1)
    assert np.abs(futures[:, 0].mean(0) - added[start]).max() < 0.05 * np.abs(added).max()
    assert spread[0] < 0.1 * spread[-1]
    assert np.array_equal(futures, fluctuation.futures(start, steps, 500, np.random.default_rng(0)))


@pytest.fixture(scope="module")
def realistic_homes(tmp_path_factory):
    """mc_maze made twice with --variability realistic and seed 3, once with seed 4."""
    root = tmp_path_factory.mktemp("realistic")
    for home, seed in (("a", 3), ("b", 3), ("c", 4)):
        synthesize(DATASETS["mc_maze"], root / home, "tiny", seed, "realistic")
    return root


def test_realistic_files_and_truth_are_deterministic_in_the_seed(realistic_homes):
    dataset = DATASETS["mc_maze"]
    folders = {home: dataset_dir(realistic_homes / home, dataset) for home in "abc"}

    def content(folder):
        io, nwb = read(folder / dataset.file_name("train"))
        with io:
            spikes = nwb.units.spike_times[:]
            velocity = nwb.processing["behavior"]["hand_vel"].data[()]
        with h5py.File(folder / TRUTH_FILE) as h5:
            return spikes, velocity, h5["train/latents"][()], h5["loadings"][()], dict(h5.attrs)

    a, b, c = (content(folders[home]) for home in "abc")
    for x, y, z in zip(a[:4], b[:4], c[:4]):
        assert np.array_equal(x, y)
        assert x.shape != z.shape or not np.array_equal(x, z)
    assert a[4]["variability"] == "realistic" and a[4]["seed"] == 3
    assert existing_synthesis(realistic_homes / "a", dataset) == ("tiny", 3, "realistic")


def test_realistic_truth_holds_the_rates_that_made_the_spikes(realistic_homes):
    """The oracle reads the truth through ``read_truth``: its rates must be the realistic ones."""
    dataset = DATASETS["mc_maze"]
    folder = dataset_dir(realistic_homes / "a", dataset)
    truth, files = read_truth(folder / TRUTH_FILE)
    assert truth.ceiling == VARIABILITIES["realistic"].ceiling_hz / 1000
    expected = truth.rates(files["train"]["latents"]).sum(axis=0)
    io, nwb = read(folder / dataset.file_name("train"))
    with io:
        observed = np.array([len(t) for t in nwb.units.to_dataframe()["spike_times"]])
    assert np.allclose(observed, expected, rtol=0.15)
    assert np.corrcoef(observed, expected)[0, 1] > 0.99


def test_rates_follow_the_exponential_below_the_ceiling_and_never_pass_it():
    ceiling = 0.2
    log_rates = np.linspace(-8, 6, 2001)
    rates = rate_law(log_rates, ceiling)
    assert np.all(np.diff(rates) >= 0)
    assert rates.max() <= ceiling
    assert np.allclose(rates[-1], ceiling, rtol=1e-6)
    far_below = np.exp(log_rates) < ceiling / 10
    assert np.allclose(rates[far_below], np.exp(log_rates[far_below]), rtol=1e-4)
    assert np.isclose(rate_law(np.log(ceiling), ceiling), ceiling * 2 ** (-1 / CEILING_SHARPNESS))
    assert np.array_equal(rate_law(log_rates, np.inf), np.exp(log_rates))


def test_realistic_rates_stay_under_the_ceiling_where_the_exponential_passes_it():
    files, truth = generate(DATASETS["mc_maze"], "tiny", 0, "realistic")
    exponential = np.exp(files["train"].latents @ truth.loadings + truth.bias)
    rates = truth.rates(files["train"].latents)
    assert exponential.max() > truth.ceiling
    assert rates.max() <= truth.ceiling == VARIABILITIES["realistic"].ceiling_hz / 1000
    _, low_truth = generate(DATASETS["mc_maze"], "tiny", 0, "low")
    assert np.isinf(low_truth.ceiling)


EVENTS = {"mc_maze": ("move_onset_time", -250, 450), "area2_bump": ("move_onset_time", -100, 500),
          "dmfc_rsg": ("set_time", -500, 500)}


def within_condition_variance(files, truth, name) -> float:
    """Across-trial variance of the true log-rates within a condition, aligned to the task's
    event, averaged over time, units and conditions."""
    event, start, stop = EVENTS[name]
    trials = files["train"].trials
    ms = trials[event].to_numpy().astype(int)[:, None] + np.arange(start, stop)
    log_rates = files["train"].latents[ms] @ truth.loadings  # (trials, ms, units)
    cond = trials["_cond"].to_numpy()
    return float(np.mean([log_rates[cond == c].var(axis=0).mean() for c in np.unique(cond) if (cond == c).sum() > 1]))


@pytest.mark.parametrize("name", list(EVENTS))
def test_realistic_trials_of_a_condition_differ_far_more_than_low_ones(name):
    low = within_condition_variance(*generate(DATASETS[name], "tiny", 0, "low"), name)
    realistic = within_condition_variance(*generate(DATASETS[name], "tiny", 0, "realistic"), name)
    assert low < 0.01 and realistic > 0.1 and realistic > 30 * low


def test_synth_skips_only_a_dataset_made_with_the_same_variability(homes, tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_HOME", str(tmp_path))
    dataset = DATASETS["mc_rtt"]

    def synth(*variability):
        result = run_cli(cli.synth, "--dataset", "mc_rtt", "--scale", "tiny", *variability)
        assert result.exit_code == 0, result.output
        return "already synthesized" in result.output

    assert not synth()
    assert synth() and synth("--variability", "low")
    assert not synth("--variability", "realistic")
    assert existing_synthesis(tmp_path, dataset) == ("tiny", 0, "realistic")
    assert synth("--variability", "realistic")
    assert not synth()
    assert existing_synthesis(tmp_path, dataset) == ("tiny", 0, "low")
    with h5py.File(dataset_dir(tmp_path, dataset) / TRUTH_FILE, "a") as h5:
        del h5.attrs["variability"]  # a truth file written before variability existed: low
    assert synth()
    assert not synth("--variability", "realistic")
    with h5py.File(dataset_dir(tmp_path, dataset) / TRUTH_FILE, "a") as h5:  # made before the posture
        h5.attrs["variability_params"] = json.dumps({**json.loads(h5.attrs["variability_params"]), "posture": 0.0})
    assert existing_synthesis(tmp_path, dataset) == ("tiny", 0, "realistic, earlier parameters")
    assert not synth("--variability", "realistic")
    assert existing_synthesis(tmp_path, dataset) == ("tiny", 0, "realistic")
    hidden_test_file(tmp_path, dataset).unlink()  # made before EvalAI's copy of the test file existed
    assert existing_synthesis(tmp_path, dataset) is None
    assert not synth("--variability", "realistic")
    assert hidden_test_file(tmp_path, dataset).is_file()
    train_file = dataset_dir(tmp_path, dataset) / dataset.file_name("train")
    intact = train_file.read_bytes()
    train_file.write_bytes(intact[:len(intact) // 2])  # cut short by a full disk
    assert existing_synthesis(tmp_path, dataset) is None
    assert not synth("--variability", "realistic")
    assert existing_synthesis(tmp_path, dataset) == ("tiny", 0, "realistic")
    assert train_file.stat().st_size == len(intact)


def test_the_command_offers_every_variability():
    option = next(p for p in cli.synth.params if p.name == "variability")
    assert list(option.type.choices) == list(VARIABILITIES) and option.default == "low"


def test_an_interrupted_synthesis_is_not_taken_for_the_earlier_dataset(tmp_path, monkeypatch):
    """Killed after its first new NWB file, a synthesis with other settings leaves no dataset that
    looks complete: the earlier truth file would have named the earlier settings, and a later
    run with those settings would have kept a mix of two datasets."""
    from nlbfab import synth_nwb
    dataset = DATASETS["mc_rtt"]
    synthesize(dataset, tmp_path, "tiny", 0)
    assert existing_synthesis(tmp_path, dataset) == ("tiny", 0, "low")
    monkeypatch.setattr(synth_nwb, "write_truth", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        synthesize(dataset, tmp_path, "tiny", 1)
    assert existing_synthesis(tmp_path, dataset) is None
