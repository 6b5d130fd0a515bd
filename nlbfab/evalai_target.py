"""The test phase's target for a synthetic dataset: what EvalAI holds for the real ones.

DANDI's test file has the held-in units only; EvalAI scores a test-phase submission against the
held-out units' spikes of the test trials, their behaviour and the PSTHs over every trial,
which only it has. ``nlbfab-synth`` writes a synthetic dataset's test file twice: DANDI's copy,
and EvalAI's (``layout.hidden_test_file``: the same held-in spikes, plus everything left out).
From EvalAI's copy and the train file this module cuts the target as nlb_tools makes the val
phase's (``make_eval_target_tensors``, trained on train and val, evaluated on test), so the test
phase of every split is scored offline exactly as the val phase is. Real datasets have no such
file: their test phase is EvalAI's to score.
"""
from __future__ import annotations

import numpy as np
from nlb_tools.make_tensors import PARAMS

from nlbfab.errors import UserError
from nlbfab.layout import Homes, hidden_test_file, truth_file
from nlbfab.native.session import open_session
from nlbfab.native.tensors import Binned, eval_target, value_fields
from nlbfab.splits import Split


def evalai_target(homes: Homes, split: Split) -> dict[str, dict]:
    """``{group: {name: array}}``: the target of a test-phase split of a synthetic dataset, for
    ``scoring.score``."""
    dataset = split.dataset
    hidden = hidden_test_file(homes.data, dataset)
    if not hidden.is_file():
        if truth_file(homes.data, dataset).is_file():
            raise UserError(f"{dataset.name} was synthesized before its test file for scoring existed: run "
                            f"'bin/nlbfab-synth --dataset {dataset.name}' with the same --scale, --seed and "
                            f"--variability, which adds it (its DANDI files come out the same: runs need not train "
                            f"again)")
        raise UserError(f"{split.name} is a test split of a real dataset: only EvalAI can score it "
                        f"(upload the run's submission-test.h5)")
    name = dataset.name
    train_file = homes.dataset_dir(dataset) / dataset.file_name("train")
    session = open_session(hidden.parent, value_fields(name), paths=[hidden, train_file])
    target = eval_target(Binned(session, split.bin_ms, session.trial_info), name,
                         include_psth="psth_params" in PARAMS[name],
                         train_split=split.train_splits, eval_split=split.eval_split)
    if name == "dmfc_rsg":
        _check_tp_conditions(target[split.group]["eval_behavior"], split)
    return target


def _check_tp_conditions(eval_behavior: np.ndarray, split: Split) -> None:
    """nlb_tools' tp correlation is a Pearson r within each (is_eye, theta, is_short) of the eval
    trials (``eval_behavior``'s first three columns), which fails on a condition of one trial."""
    _, counts = np.unique(eval_behavior[:, :3], axis=0, return_counts=True)
    if counts.min() < 2:
        raise UserError(f"{split.name}: {np.sum(counts < 2)} of its test conditions have a single trial, and "
                        f"nlb_tools' tp correlation needs two: synthesize dmfc_rsg at --scale small or full")
