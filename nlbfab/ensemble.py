"""An ensemble's prediction: the mean of its members' rates, and which members go into it.

A run with ``--ensemble K`` trains K members in one loop (``nlbfab.train``). Averaging the rates
of models trained alike removes what each learnt by chance; the NLB'21 winners averaged 7 to 21
models per dataset, chosen greedily by val co-bps out of many (AE Studio). ``--ensemble-top N``
makes the same greedy choice, of at most N, among a run's members on the val phase; the test
phase, which has no held-out target to choose by, reuses the choice of the val run of the same
tag and split.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Sequence

import numpy as np
import torch

from nlbfab import layout
from nlbfab.layout import Homes
from nlbfab.splits import Split


def mean_logrates(logrates: torch.Tensor) -> torch.Tensor:
    """The log of the members' mean rate: ``logrates: (members, ...)`` -> ``(...)``, in float32.
    One member's log-rates are returned as they are."""
    if logrates.shape[0] == 1:
        return logrates[0]
    return torch.logsumexp(logrates.float(), 0) - math.log(logrates.shape[0])


def greedy_selection(member_rates: Sequence[np.ndarray], score: Callable[[np.ndarray], float], count: int) -> list[int]:
    """At most ``count`` members chosen one at a time, each the one whose rates added to the mean
    of those already chosen give the highest ``score`` (higher is better), starting from the best
    member alone, and no more once no member left raises the mean's score: a weak member (one
    that stopped early at a poor value) would pull the mean below the better members without it.
    ``member_rates``: each member's ``(trials, bins, neurons)`` rates. Returns the chosen
    members' indices in the order chosen."""
    chosen, total, best = [], np.zeros_like(member_rates[0], dtype=np.float64), -math.inf
    while len(chosen) < count:
        candidates = [k for k in range(len(member_rates)) if k not in chosen]
        scores = np.array([score((total + member_rates[k]) / (len(chosen) + 1)) for k in candidates])
        if np.isnan(scores).all():
            pick = 0
        else:
            pick = int(np.nanargmax(scores))
            if chosen and not scores[pick] > best:
                break
            best = scores[pick]
        chosen.append(candidates[pick])
        total += member_rates[candidates[pick]]
    return chosen


def val_choice(homes: Homes, run_tag: str, split: Split, members: int) -> list[int] | None:
    """The members the val run of the same tag, dataset and bin width chose, where that run
    finished with as many members; else None."""
    ensemble = layout.read_metrics(homes.run_dir(run_tag, replace(split, phase="val"))).get("ensemble", {})
    if len(ensemble.get("members", [])) != members:
        return None
    return ensemble.get("chosen")
