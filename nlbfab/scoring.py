"""Score a val-phase submission exactly as EvalAI does, with ``nlb_tools.evaluation.evaluate``."""
from __future__ import annotations

from pathlib import Path

from nlb_tools.evaluation import evaluate

from nlbfab.errors import UserError
from nlbfab.splits import Split

# evaluate() reports the scaling sets together, each key prefixed with its test-phase trial count
SCALING_TAGS = {"mc_maze_large": "[500]", "mc_maze_medium": "[250]", "mc_maze_small": "[100]"}


def score(target_path: Path, submission_path: Path, split: Split) -> dict[str, float]:
    """The split's metrics, e.g. ``{'co-bps': .., 'vel R2': .., 'psth R2': .., 'fp-bps': ..}``."""
    # evaluate() opens files only when given str paths
    results = {k: v for entry in evaluate(str(target_path), str(submission_path)) for k, v in entry.items()}
    tag = SCALING_TAGS.get(split.dataset.name)
    if tag:
        scaling = results.get("mc_maze_scaling_split" if split.bin_ms == 5 else "mc_maze_scaling_20_split", {})
        metrics = {k[len(tag) + 1:]: v for k, v in scaling.items() if k.startswith(f"{tag} ")}
    else:
        metrics = results.get(f"{split.group}_split", {})
    if not metrics:  # evaluate() silently skips a misnamed group
        raise UserError(f"no scores for {split.name} in {submission_path}: it needs a group named "
                        f"'{split.group}' with eval_rates_heldout")
    return {k: float(v) for k, v in metrics.items()}
