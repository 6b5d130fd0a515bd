"""A training run's settings, kept apart from the loop so that commands parse options without
importing torch."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

# the stopping rule counts epochs, so an epoch should take a few optimizer steps on every dataset
BATCHES_PER_EPOCH = 5


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; saved as ``config.json`` and logged as hyperparameters."""

    split: str
    model: str = "sae"
    hidden_size: int = 64
    batch_size: int | None = None  # None: auto_batch_size of the split's train trials
    learning_rate: float = 5e-3
    weight_decay: float = 1e-4
    dropout: float = 0.2
    grad_clip: float = 5.0
    seed: int = 0
    max_epochs: int = 400
    # over two plateaus, so that a decayed rate gets its own: at 25 with 15-epoch plateaus,
    # mc_maze_medium stopped 10 epochs after its first decay, 0.001 co-bps short of 2,000 epochs
    patience: int = 30
    lr_decay: float = 0.5
    # 12, not 15: mc_maze stops at 123 epochs instead of 184, all three mc_maze sizes still above
    # the 2,000-epoch schedule's co-bps; 10 left mc_maze_small below it (benchmarks/README.md)
    lr_patience: int = 12
    min_lr: float = 1e-3
    log_every_n_epochs: int = 25
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: str = "1"
    strategy: str = "auto"
    run_tag: str = "default"


def auto_batch_size(train_trials: int) -> int:
    """Batches of 64 trials, smaller on small datasets so that an epoch still takes about
    ``BATCHES_PER_EPOCH`` optimizer steps (never under 16 trials). mc_maze_small's 75 train trials
    made 2 batches of 64 an epoch: it took 241 epochs to stop, against 151 with 16, at better
    co-bps (with 15-epoch plateaus; benchmarks/README.md)."""
    return max(16, min(64, math.ceil(train_trials / BATCHES_PER_EPOCH)))


def with_batch_size(config: TrainConfig, train_trials: int) -> TrainConfig:
    """``config`` with its batch size settled: the given one, else ``auto_batch_size``."""
    return config if config.batch_size else replace(config, batch_size=auto_batch_size(train_trials))
