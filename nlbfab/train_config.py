"""A training run's settings, kept apart from the loop so that commands parse options without
importing torch."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; saved as ``config.json`` and logged as hyperparameters."""

    split: str
    model: str = "sae"
    hidden_size: int = 64
    batch_size: int = 64
    learning_rate: float = 5e-3
    weight_decay: float = 1e-4
    dropout: float = 0.2
    grad_clip: float = 5.0
    seed: int = 0
    max_epochs: int = 400
    patience: int = 25
    lr_decay: float = 0.5
    lr_patience: int = 15
    min_lr: float = 1e-3
    log_every_n_epochs: int = 25
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: str = "1"
    strategy: str = "auto"
    run_tag: str = "default"
