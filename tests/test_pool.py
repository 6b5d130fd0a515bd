"""nlbfab-pool: the mean rates of finished runs of a split, chosen greedily by val co-bps on the
val phase and taken from the val pool's choice on the test phase; bad pools refused in one line
with nothing written."""
import h5py
import numpy as np
import pytest

from nlbfab import cli, layout
from nlbfab.data import load_split
from nlbfab.evaluation import co_bps
from nlbfab.oracle import oracle_rates
from nlbfab.splits import get_split
from nlbfab.submission import expected_shapes, submit
from tests.conftest import homes_with, run_cli

VAL = get_split("mc_maze-20ms-val")
TEST = get_split("mc_maze-20ms-test")


def rates_of(tag, split) -> dict:
    with h5py.File(layout.rates_file(homes_with().run_dir(tag, split)), "r") as h5:
        return {key: h5[split.group][key][()] for key in h5[split.group]}


def pool_file(tag, split) -> dict:
    with h5py.File(layout.submission_file(homes_with().tag_dir(tag), split.phase), "r") as h5:
        return {key: h5[split.group][key][()] for key in h5[split.group]}


@pytest.fixture(scope="module")
def runs(prepared, synthetic):
    """Finished runs of both phases, as their rates files: two noisy copies of the true rates
    (independent noise, so their mean is closer to the truth than either) and one that predicts
    every neuron's mean rate (which no mean gains from)."""
    homes = homes_with()
    for split in (VAL, TEST):
        truth = oracle_rates(synthetic, split)
        noise = np.random.default_rng(0)
        for tag in ("pool-noisy-a", "pool-noisy-b"):
            noisy = {k: v * np.exp(noise.normal(0, 0.3, v.shape)) for k, v in truth.items()}
            submit(split, noisy, homes.tag_dir(tag), expected_shapes(split, homes))
        flat = {k: np.broadcast_to(v.mean((0, 1)), v.shape) for k, v in truth.items()}
        submit(split, flat, homes.tag_dir("pool-flat"), expected_shapes(split, homes))
    return ["pool-flat", "pool-noisy-a", "pool-noisy-b"]


def test_val_pool_is_the_mean_of_the_runs_that_raise_its_co_bps(runs):
    result = run_cli(cli.pool, "--split", VAL.name, *[a for tag in runs for a in ("--run-tag", tag)],
                     "--pool-tag", "pool-val")
    assert result.exit_code == 0, result.output
    summary = layout.read_metrics(homes_with().run_dir("pool-val", VAL))
    data = load_split(VAL, homes_with())
    each = {tag: co_bps(data, rates_of(tag, VAL)["eval_rates_heldout"]) for tag in runs}
    assert summary["pool"]["co-bps"] == pytest.approx(each)
    best = max(each, key=each.get)
    assert summary["pool"]["chosen"][0] == best and set(summary["pool"]["chosen"]) == {"pool-noisy-a", "pool-noisy-b"}
    pooled = pool_file("pool-val", VAL)
    for key, value in pooled.items():
        np.testing.assert_allclose(value, (rates_of("pool-noisy-a", VAL)[key] + rates_of("pool-noisy-b", VAL)[key]) / 2,
                                   rtol=1e-6)
    assert summary["metrics"]["co-bps"] > max(each.values())  # scored as EvalAI would, above every run
    assert f"co-bps     {summary['metrics']['co-bps']:.4f}" in result.output and "* pool-noisy-a" in result.output

    top = run_cli(cli.pool, "--split", VAL.name, *[a for tag in runs for a in ("--run-tag", tag)],
                  "--pool-tag", "pool-top1", "--top", "1")
    assert top.exit_code == 0, top.output
    assert layout.read_metrics(homes_with().run_dir("pool-top1", VAL))["pool"]["chosen"] == [best]


def test_test_pool_takes_the_val_pools_choice(runs):
    chose = run_cli(cli.pool, "--split", VAL.name, *[a for tag in runs for a in ("--run-tag", tag)],
                    "--pool-tag", "pool-both")
    assert chose.exit_code == 0, chose.output
    result = run_cli(cli.pool, "--split", TEST.name, "--pool-tag", "pool-both")
    assert result.exit_code == 0, result.output
    assert "the runs the val pool chose" in result.stderr and "EvalAI would hold" in result.output
    summary = layout.read_metrics(homes_with().run_dir("pool-both", TEST))
    assert set(summary["pool"]["chosen"]) == {"pool-noisy-a", "pool-noisy-b"} and "co-bps" in summary["metrics"]
    np.testing.assert_allclose(pool_file("pool-both", TEST)["eval_rates_heldout"],
                               (rates_of("pool-noisy-a", TEST)["eval_rates_heldout"]
                                + rates_of("pool-noisy-b", TEST)["eval_rates_heldout"]) / 2, rtol=1e-6)
    named = run_cli(cli.pool, "--split", TEST.name, "--run-tag", "pool-flat", "--run-tag", "pool-noisy-a",
                    "--pool-tag", "pool-named")
    assert named.exit_code == 0, named.output
    assert layout.read_metrics(homes_with().run_dir("pool-named", TEST))["pool"]["chosen"] == ["pool-flat",
                                                                                               "pool-noisy-a"]


@pytest.mark.parametrize("args, message", [
    ([VAL.name, "pool-noisy-a"], "name two or more runs to pool"),
    ([VAL.name, "pool-noisy-a", "pool-noisy-a"], "a run is named twice"),
    ([VAL.name, "pool-noisy-a", "pool-missing"], "run 'pool-missing' has no rates for mc_maze-20ms-val"),
    ([TEST.name], "no val pool 'pool-new' of mc_maze at 20 ms"),
    ([TEST.name, "pool-noisy-a", "--top", "1"], "--top chooses by val co-bps"),
    ([VAL.name, "pool-noisy-a", "pool-new/x"], "--run-tag 'pool-new/x'"),
])
def test_a_pool_that_cannot_be_made_is_refused_in_one_line(runs, args, message):
    split, *rest = args
    options = [a for tag in rest if not tag.startswith("--") and tag != "1" for a in ("--run-tag", tag)]
    options += [a for a in rest if a.startswith("--") or a == "1"]
    result = run_cli(cli.pool, "--split", split, *options, "--pool-tag", "pool-new")
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert not homes_with().tag_dir("pool-new").exists()


@pytest.mark.parametrize("pool_tag, message", [("pool-noisy-a", "is one of the pooled runs"),
                                               ("pool-trained", "holds a trained run of mc_maze-20ms-val")])
def test_a_pool_never_replaces_a_run(runs, pool_tag, message):
    trained = homes_with().run_dir("pool-trained", VAL)
    trained.mkdir(parents=True, exist_ok=True)
    layout.write_json(layout.config_file(trained), {"split": VAL.name})
    before = rates_of("pool-noisy-a", VAL)
    result = run_cli(cli.pool, "--split", VAL.name, "--run-tag", "pool-noisy-a", "--run-tag", "pool-noisy-b",
                     "--pool-tag", pool_tag)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    after = rates_of("pool-noisy-a", VAL)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert not layout.rates_file(trained).exists() and not layout.metrics_file(trained).exists()


def test_a_runs_damaged_rates_file_is_one_line_naming_the_run(runs):
    homes = homes_with()
    cut = homes.run_dir("pool-cut", VAL)
    cut.mkdir(parents=True)
    whole = layout.rates_file(homes.run_dir("pool-noisy-a", VAL)).read_bytes()
    layout.rates_file(cut).write_bytes(whole[:3000])  # a full disk, a killed copy
    result = run_cli(cli.pool, "--split", VAL.name, "--run-tag", "pool-cut", "--run-tag", "pool-noisy-b",
                     "--pool-tag", "pool-new")
    assert result.exit_code == 2 and result.stderr.startswith("error: run 'pool-cut': cannot read mc_maze-20ms-val's "
                                                              "rates from "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not homes.tag_dir("pool-new").exists()
