"""One submission from several finished runs of a split: the mean of their rates.

Runs of other models, settings or seeds err differently, so the mean of a few scores above each
(the NLB'21 winners submitted the mean of 7 to 21 models, chosen greedily by val co-bps out of
many). ``--ensemble-top`` makes that choice among one run's members and ``nlbfab-search
--submit-top`` among a search's trials; ``nlbfab-pool`` makes it among any runs of a split, each
run's submitted rates (the mean of its chosen members) counting once. The test phase has no
held-out target to choose by, so a test-phase pool takes the runs its val pool chose, by tag.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from nlbfab import layout
from nlbfab.data import load_split
from nlbfab.ensemble import greedy_selection
from nlbfab.errors import UserError, first_line
from nlbfab.evaluation import co_bps
from nlbfab.layout import Homes
from nlbfab.scoring import local_target, submit_and_score
from nlbfab.splits import Split
from nlbfab.submission import check_rates, expected_shapes


def read_rates(path: Path, split: Split) -> dict[str, np.ndarray]:
    """A run's rates file (``nlbfab.submission.write_rates``): the split's arrays by name."""
    with h5py.File(path, "r") as h5:
        return {key: h5[split.group][key][()] for key in h5[split.group]}


def submit_mean(split: Split, run_dirs: list[Path], homes: Homes, run_tag: str, report: Callable[[str], None]) -> dict:
    """``submit_mean_rates`` of the rates files of ``run_dirs`` (runs on ``split``)."""
    return submit_mean_rates(split, [read_rates(layout.rates_file(run_dir), split) for run_dir in run_dirs], homes,
                             run_tag, report)


def submit_mean_rates(split: Split, rates: list[dict[str, np.ndarray]], homes: Homes, run_tag: str,
                      report: Callable[[str], None]) -> dict:
    """The mean of runs' ``rates`` (each ``read_rates``' arrays) as the split's group of
    ``RUNS_HOME/{run_tag}``'s submission file, its shapes checked, and scored as EvalAI would
    where it can be here (``local_target``). Returns ``{"submission": path}`` and, where scored,
    ``"metrics"``."""
    mean = {key: np.mean([r[key] for r in rates], 0) for key in rates[0]}
    return submit_and_score(split, mean, homes.tag_dir(run_tag), expected_shapes(split, homes),
                            local_target(homes, split, report))


def run_rates(homes: Homes, run_tag: str, split: Split, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The rates a finished run of ``run_tag`` submitted for ``split``, checked against the
    split's shapes (``expected_shapes``); one line naming the run where there are none or they do
    not fit."""
    path = layout.rates_file(homes.run_dir(run_tag, split))
    if not path.is_file():
        raise UserError(f"run '{run_tag}' has no rates for {split.name} ({path}): train it with 'bin/nlbfab-train "
                        f"--split {split.name} --run-tag {run_tag}', or check the tag and RUNS_HOME")
    try:
        rates = read_rates(path, split)
    except (OSError, KeyError) as error:  # truncated by a full disk or a killed copy, or another split's
        raise UserError(f"run '{run_tag}': cannot read {split.name}'s rates from {path} ({first_line(error)}); "
                        f"train it again on this split") from None
    try:
        check_rates(rates, expected, split.group)
    except UserError as error:
        raise UserError(f"run '{run_tag}': {error}; train it again on this split's tensors") from None
    return rates


def val_pool_choice(homes: Homes, pool_tag: str, split: Split) -> list[str] | None:
    """The runs the val pool of ``pool_tag`` chose for the split's dataset and bin width, or None."""
    return layout.read_metrics(homes.run_dir(pool_tag, replace(split, phase="val"))).get("pool", {}).get("chosen")


def check_pool_tag(homes: Homes, pool_tag: str, run_tags: list[str], split: Split) -> None:
    """The pool writes into its own tag: never one of the pooled runs', nor a trained run's."""
    if pool_tag in run_tags:
        raise UserError(f"--pool-tag {pool_tag} is one of the pooled runs: its rates would be replaced; pick a new tag")
    if layout.config_file(homes.run_dir(pool_tag, split)).is_file():
        raise UserError(f"--pool-tag {pool_tag} holds a trained run of {split.name}, which the pool would replace: "
                        f"pick a new tag")


def pool_runs(split: Split, run_tags: list[str], pool_tag: str, top: int | None, homes: Homes,
              report: Callable[[str], None]) -> dict:
    """Pool finished runs of ``split`` into the submission of ``pool_tag``. On the val phase: the
    mean of at most ``top`` (default all) of ``run_tags``, chosen greedily by val co-bps; on the
    test phase: the mean of ``run_tags``, or where none are given of the runs the val pool of the
    same tag chose. Writes the split's rates, its group of the submission file and a summary
    (``metrics.json``: the runs, each run's val co-bps, the chosen ones and the scores) into
    ``RUNS_HOME/{pool_tag}``; returns the summary."""
    if len(set(run_tags)) != len(run_tags):
        raise UserError(f"--run-tag {', '.join(run_tags)}: a run is named twice")
    if split.phase == "test":
        if top is not None:
            raise UserError("--top chooses by val co-bps, which the test phase has not: pool the val split with "
                            "--top, then the test split with the same --pool-tag, which takes the val pool's choice")
        if not run_tags:
            run_tags = val_pool_choice(homes, pool_tag, split)
            if run_tags is None:
                raise UserError(f"no val pool '{pool_tag}' of {split.dataset.name} at {split.bin_ms} ms to take the "
                                f"runs from: pool {replace(split, phase='val').name} first, or name the runs with "
                                f"--run-tag")
            report(f"{split.name}: the runs the val pool chose: {', '.join(run_tags)}")
    elif len(run_tags) < 2:
        raise UserError("name two or more runs to pool, each with --run-tag")
    check_pool_tag(homes, pool_tag, run_tags, split)
    expected = expected_shapes(split, homes)
    rates = [run_rates(homes, tag, split, expected) for tag in run_tags]
    summary = {"split": split.name, "pool": {"runs": list(run_tags), "chosen": list(run_tags)}}
    if split.phase == "val":
        data = load_split(split, homes)
        summary["pool"]["co-bps"] = {tag: co_bps(data, r["eval_rates_heldout"]) for tag, r in zip(run_tags, rates)}
        chosen = greedy_selection([r["eval_rates_heldout"] for r in rates], lambda mean: co_bps(data, mean),
                                  top or len(run_tags))
        summary["pool"]["chosen"] = [run_tags[k] for k in chosen]
    chosen_rates = [rates[run_tags.index(tag)] for tag in summary["pool"]["chosen"]]
    summary |= submit_mean_rates(split, chosen_rates, homes, pool_tag, report)
    layout.write_json(layout.metrics_file(homes.run_dir(pool_tag, split)), summary)
    return summary
