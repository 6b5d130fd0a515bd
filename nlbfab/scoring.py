"""Score a submission exactly as EvalAI does, with ``nlb_tools.evaluation.evaluate``.

``score`` runs nlb_tools unpatched, its GridSearchCV velocity decoder included: it gives a run's
final, authoritative number. The loop's evaluation hook uses ``nlbfab.evaluation.metrics``
instead, which swaps in an equal but fast decoder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import h5py
import joblib
from nlb_tools.evaluation import evaluate
from threadpoolctl import threadpool_limits

from nlbfab.cores import available_cpus
from nlbfab.errors import UserError, first_line
from nlbfab.evalai_target import evalai_target
from nlbfab.layout import Homes, hidden_test_file, submission_file, truth_file
from nlbfab.splits import Split
from nlbfab.submission import submit

# evaluate() reports the scaling sets together, each key prefixed with its test-phase trial count
SCALING_TAGS = {"mc_maze_large": "[500]", "mc_maze_medium": "[250]", "mc_maze_small": "[100]"}


def split_metrics(results: list[dict], split: Split) -> dict[str, float]:
    """The split's metrics from ``evaluate()``'s result list, e.g. ``{'co-bps': .., 'vel R2': ..,
    'psth R2': .., 'fp-bps': ..}``; empty where the split was not scored."""
    merged = {k: v for entry in results for k, v in entry.items()}
    tag = SCALING_TAGS.get(split.dataset.name)
    if tag:
        scaling = merged.get("mc_maze_scaling_split" if split.bin_ms == 5 else "mc_maze_scaling_20_split", {})
        return {k[len(tag) + 1:]: float(v) for k, v in scaling.items() if k.startswith(f"{tag} ")}
    return {k: float(v) for k, v in merged.get(f"{split.group}_split", {}).items()}


def scoring_threads() -> int:
    """The cores this process may use: those nlbfab-all gave its slot, else all of them."""
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or available_cpus()


def score(target: Path | dict, submission_path: Path, split: Split) -> dict[str, float]:
    """Score the split's group of a submission file against its target: the split's target file,
    or the target arrays already in memory as ``{group: {name: array}}``; a file nlb_tools cannot
    score (damaged, of other shapes, NaN rates) fails in one line."""
    try:
        results = _evaluate(target, submission_path, split)
    except (OSError, ValueError, KeyError, AssertionError) as error:  # nlb_tools asserts, e.g. on NaN rates
        reason = first_line(error)
        raise UserError(f"cannot score {submission_path} on {split.name} ({reason}): a run's damaged submission is "
                        f"rebuilt from its rates by 'bin/nlbfab-submit --run-tag TAG'") from None
    metrics = split_metrics(results, split)
    if not metrics:  # evaluate() silently skips a misnamed group
        raise UserError(f"no scores for {split.name} in {submission_path}: it needs a group named "
                        f"'{split.group}' with eval_rates_heldout")
    return metrics


def _evaluate(target: Path | dict, submission_path: Path, split: Split) -> list[dict]:
    # GridSearchCV's small ridge fits are independent: one thread per core, each fit on a
    # single BLAS thread (benchmarks/README.md), with nlb_tools' numbers
    with threadpool_limits(1), joblib.parallel_config(backend="threading", n_jobs=scoring_threads()), \
            h5py.File(submission_path, "r") as submission:
        # evaluate() opens files only when given str paths, and takes mappings as they are. It is
        # shown the split's group alone: a run's file holds its other splits too, whose targets are
        # not here, and for each of those evaluate() would log a warning that its data is missing
        groups = {split.group: submission[split.group]} if split.group in submission else {}
        return evaluate(target if isinstance(target, dict) else str(target), groups)


def submit_and_score(split: Split, rates: dict, run_dir: Path, expected: dict, target: Path | dict | None) -> dict:
    """Merge a split's rates into the run's submission file (``nlbfab.submission.submit``) and,
    given a ``target`` (``local_target``), score that file as EvalAI would. Returns
    ``{"submission": path}`` and, where scored, ``"metrics"``."""
    path = submit(split, rates, run_dir, expected)
    result = {"submission": str(path)}
    if target is not None:
        result["metrics"] = score(target, path, split)
    return result


def local_target(homes: Homes, split: Split, report: Callable[[str], None]) -> Path | dict | None:
    """What a split's submission is scored against here: the val phase's target file; on the test
    phase the target EvalAI holds, cut from a synthetic dataset's copy of its test file
    (``cut_test_target``); None for a real dataset's test phase, which only EvalAI scores, and
    where the copy cannot be scored (``report`` says why: the submission stands)."""
    if split.phase == "val":
        return homes.split_file(split, "eval_target")
    if not hidden_test_file(homes.data, split.dataset).is_file():
        return None
    try:
        return cut_test_target(homes, split, report)
    except UserError as error:
        report(f"{split.name}: not scored here: {error}")
        return None


def cut_test_target(homes: Homes, split: Split, report: Callable[[str], None]) -> dict:
    """A test split's target as EvalAI holds it (``nlbfab.evalai_target``: synthetic datasets
    only, a real one's fails in one line); ``report`` says when it is being cut."""
    hidden = hidden_test_file(homes.data, split.dataset)
    if hidden.is_file():  # else evalai_target says why in one line
        report(f"{split.name}: cutting its target from {hidden} ...")
    return evalai_target(homes, split)


def _making(split: Split, tag: str) -> str:
    """The command that writes ``tag``'s submission of ``split``, for an error line."""
    if tag == "oracle":
        return f"'bin/nlbfab-baseline --split {split.name} --method oracle'"
    return (f"'bin/nlbfab-train --split {split.name} --run-tag {tag}' (a model) or 'bin/nlbfab-baseline --split "
            f"{split.name} --run-tag {tag}' (smoothing)")


def _check_scorable(split: Split, tag: str, path: Path) -> None:
    """Fail in one line, naming the command that makes it, where run ``tag`` has no submission
    file at ``path`` or the file has no group of ``split`` (a run of other splits): checked for
    every run before a test target is cut, which takes a while. A damaged file passes here, for
    ``score`` to name its repair."""
    if not path.is_file():
        raise UserError(f"no submission for run '{tag}' at {path}: make it with {_making(split, tag)}")
    try:
        with h5py.File(path, "r") as submission:
            present = split.group in submission
    except OSError:
        return
    if not present:
        raise UserError(f"run '{tag}' has no {split.name} in {path} (no group '{split.group}'): make it with "
                        f"{_making(split, tag)}")


def score_table(split: Split, run_tags: list[str], homes: Homes, report: Callable[[str], None] = print) -> str:
    """A table of each run's metrics on ``split``; with a run tagged ``oracle``, a column gives
    co-bps as a share of the oracle's (on a synthetic dataset without it, ``report`` says how to
    add it). A test split is scored against the target EvalAI would hold (``cut_test_target``),
    once every run's file is found."""
    paths = {tag: submission_file(homes.tag_dir(tag), split.phase) for tag in run_tags}
    for tag, path in paths.items():
        _check_scorable(split, tag, path)
    if split.phase == "test":
        target = cut_test_target(homes, split, report)
    else:
        target = homes.split_file(split, "eval_target")
        if not target.is_file():
            raise UserError(f"missing {target}: run 'bin/nlbfab-prep --split {split.name}'")
    rows = {tag: score(target, path, split) for tag, path in paths.items()}
    names = list(dict.fromkeys(k for metrics in rows.values() for k in metrics))
    oracle = rows.get("oracle", {}).get("co-bps")
    if oracle is None and truth_file(homes.data, split.dataset).is_file():
        report(f"(each run's share of the true rates' co-bps: add --run-tag oracle, made by 'bin/nlbfab-baseline "
               f"--split {split.name} --method oracle')")
    width = max(14, *(len(tag) + 2 for tag in rows))
    header = f"{'run':{width}s}" + "".join(f"{n:>10s}" for n in names) + ("  of oracle" if oracle else "")
    lines = [f"{split.name}", header]
    for tag, metrics in rows.items():
        line = f"{tag:{width}s}" + "".join(f"{metrics[n]:10.4f}" if n in metrics else f"{'-':>10s}" for n in names)
        if oracle:
            line += f"  {100 * metrics['co-bps'] / oracle:8.1f}%"
        lines.append(line)
    return "\n".join(lines)
