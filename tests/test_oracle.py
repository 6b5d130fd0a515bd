"""The oracle (true rates) is aligned like the tensors and beats spike smoothing on co-bps."""
import h5py
import numpy as np
import pytest

from nlbfab import cli
from nlbfab.oracle import oracle_rates, true_rate_dataset
from nlbfab.scoring import score
from nlbfab.smoothing import SETTINGS, smoothing_rates
from nlbfab.splits import DATASETS, get_split, splits_of
from nlbfab.submission import write_rates
from nlbfab.layout import dataset_dir
from tests.conftest import run_cli


def tensors(prepared, split, name):
    with h5py.File(prepared / split.name / name) as h5:
        return {k: h5[k][()] for k in h5 if isinstance(h5[k], h5py.Dataset)}


@pytest.mark.parametrize("name", ["mc_maze", "dmfc_rsg", "mc_rtt"])
def test_oracle_is_shaped_like_the_splits_tensors(prepared, synthetic, name):
    rate_dataset = true_rate_dataset(dataset_dir(synthetic, DATASETS[name]))
    for split in splits_of(DATASETS[name]):
        rates = oracle_rates(synthetic, split, rate_dataset)
        train = tensors(prepared, split, "train_input.h5")
        evaluation = tensors(prepared, split, "eval_input.h5")
        for key in ("heldin", "heldout", "heldin_forward", "heldout_forward"):
            assert rates[f"train_rates_{key}"].shape == train[f"train_spikes_{key}"].shape
        assert rates["eval_rates_heldin"].shape == evaluation["eval_spikes_heldin"].shape
        assert np.all(np.isfinite(rates["eval_rates_heldout"])) and rates["eval_rates_heldout"].min() > 0


def test_oracle_tracks_the_spikes_trial_by_trial(prepared, synthetic):
    split = get_split("mc_maze-20ms-val")
    rates = oracle_rates(synthetic, split)
    spikes = tensors(prepared, split, "train_input.h5")["train_spikes_heldin"]
    assert np.isclose(rates["train_rates_heldin"].mean(), spikes.mean(), rtol=0.1)
    # trial-averaged per neuron and bin: the PSTH-like structure agrees
    assert np.corrcoef(rates["train_rates_heldin"].mean(0).ravel(), spikes.mean(0).ravel())[0, 1] > 0.8


@pytest.mark.parametrize("name", ["mc_maze-20ms-val", "dmfc_rsg-20ms-val", "mc_maze_large-05ms-val"])
def test_oracle_beats_smoothing_on_co_bps(prepared, synthetic, tmp_path, name):
    split = get_split(name)
    train = tensors(prepared, split, "train_input.h5")
    evaluation = tensors(prepared, split, "eval_input.h5")
    smooth = smoothing_rates(train["train_spikes_heldin"], train["train_spikes_heldout"],
                             evaluation["eval_spikes_heldin"], split.bin_ms, *SETTINGS[split.dataset.name])
    oracle = oracle_rates(synthetic, split)
    target = prepared / split.name / "eval_target.h5"
    scores = {}
    for model, rates in (("smoothing", smooth), ("oracle", oracle)):
        scores[model] = score(target, write_rates(tmp_path / f"{model}.h5", split.group, split.phase, rates), split)
    assert scores["oracle"]["co-bps"] > scores["smoothing"]["co-bps"] + 0.02
    if "fp-bps" in scores["oracle"]:
        assert scores["oracle"]["fp-bps"] > 0


def test_baseline_command_writes_and_scores_a_submission(prepared, synthetic, homes):
    result = run_cli(cli.baseline, "--method", "oracle", "--split", "area2_bump-20ms-val", "--split", "area2_bump-20ms-test")
    assert result.exit_code == 0, result.output
    assert "co-bps" in result.output
    with h5py.File(homes["RUNS_HOME"] / "oracle" / "submission-val.h5") as h5:
        assert list(h5) == ["area2_bump_20"]
    with h5py.File(homes["RUNS_HOME"] / "oracle" / "submission-test.h5") as h5:
        assert h5["area2_bump_20/eval_rates_heldout"].shape[0] == 12
    result = run_cli(cli.baseline, "--split", "area2_bump-20ms-val")
    assert result.exit_code == 0 and "smoothing rates written" in result.output
    assert (homes["RUNS_HOME"] / "smoothing" / "submission-val.h5").is_file()


def test_a_real_dataset_has_no_oracle(tmp_path):
    from nlbfab.errors import UserError
    with pytest.raises(UserError, match="only datasets made by 'bin/nlbfab-synth' have an oracle"):
        true_rate_dataset(tmp_path)


def test_score_gives_nlb_tools_own_numbers_with_its_ridge_fits_in_parallel(prepared, synthetic, tmp_path,
                                                                            monkeypatch):
    from nlb_tools.evaluation import evaluate
    from nlbfab.scoring import split_metrics
    split = get_split("mc_maze-20ms-val")
    target = prepared / split.name / "eval_target.h5"
    submission = write_rates(tmp_path / "oracle.h5", split.group, split.phase, oracle_rates(synthetic, split))
    plain = split_metrics(evaluate(str(target), str(submission)), split)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert score(target, submission, split) == pytest.approx(plain, rel=1e-9, abs=1e-12)
    assert set(plain) == {"co-bps", "vel R2", "psth R2", "fp-bps"}


def test_score_reads_only_its_splits_group_of_a_runs_file(prepared, synthetic, tmp_path, caplog):
    """A run's submission file holds every split it trained; scoring one split must neither warn
    that the others' targets are missing nor change the split's numbers."""
    split, other = get_split("mc_maze-20ms-val"), get_split("mc_maze-05ms-val")
    target = prepared / split.name / "eval_target.h5"
    alone = score(target, write_rates(tmp_path / "alone.h5", split.group, split.phase, oracle_rates(synthetic, split)),
                  split)
    both = write_rates(tmp_path / "both.h5", other.group, other.phase, oracle_rates(synthetic, other))
    with h5py.File(both, "a") as h5, h5py.File(tmp_path / "alone.h5") as source:
        source.copy(split.group, h5)
    with caplog.at_level("WARNING", logger="nlb_tools.evaluation"):  # the commands keep it at ERROR
        assert score(target, both, split) == alone
    assert "not found" not in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "fewer trials", "NaN rates"])
def test_a_submission_nlb_tools_cannot_score_is_one_line(prepared, synthetic, tmp_path, damage):
    from nlbfab.errors import UserError
    split = get_split("mc_maze-20ms-val")
    path = write_rates(tmp_path / "damaged.h5", split.group, split.phase, oracle_rates(synthetic, split))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    else:
        with h5py.File(path, "a") as h5:
            rates = h5[f"{split.group}/eval_rates_heldout"][()]
            del h5[f"{split.group}/eval_rates_heldout"]
            h5[f"{split.group}/eval_rates_heldout"] = rates[:3] if damage == "fewer trials" else rates * np.nan
    with pytest.raises(UserError, match=r"cannot score .*damaged.h5 on mc_maze-20ms-val .*bin/nlbfab-submit"):
        score(prepared / split.name / "eval_target.h5", path, split)


def test_a_baseline_does_not_overwrite_a_trained_runs_rates(prepared, synthetic, homes):
    run_dir = homes["RUNS_HOME"] / "trained" / "area2_bump-20ms-val"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    result = run_cli(cli.baseline, "--method", "oracle", "--split", "area2_bump-20ms-val", "--run-tag", "trained")
    assert result.exit_code == 2 and "run 'trained' holds a trained model of area2_bump-20ms-val" in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]
