"""Run by test_ddp.py as a script: train a few epochs with Fabric on DEVICES CPU processes
(DDP over gloo when more than one) and save each rank's final parameters.
Usage: ddp_check.py PREP_HOME DEVICES OUT [MODEL [HPARAMS_JSON [ENSEMBLE [WITH_SPLITS]]]]"""
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from lightning_fabric import Fabric

from nlbfab.config import homes
from nlbfab.data import load_split, train_trials_only
from nlbfab.splits import get_split
from nlbfab.train import Companion, Run, TrainConfig, create_train_state, train_epoch

prep_home, devices, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
model = sys.argv[4] if len(sys.argv) > 4 else "sae"
hparams = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {"hidden_size": 16}
ensemble = int(sys.argv[6]) if len(sys.argv) > 6 else 1
with_splits = sys.argv[7].split(",") if len(sys.argv) > 7 else []
config = TrainConfig(split="mc_maze-20ms-val", model=model, hparams=hparams, batch_size=8, dropout=0.0, seed=5,
                     ensemble=ensemble)
fabric = Fabric(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto")
fabric.launch()
data, *others = (load_split(get_split(name), replace(homes(), prep=prep_home)) for name in [config.split, *with_splits])
state = create_train_state(fabric, config, data, tuple(others))
companions = tuple(Companion(other.split.name, train_trials_only(other), 8) for other in others)
initial = {k: v.detach().clone() for k, v in state.module.state_dict().items()}
for epoch in range(3):
    train_epoch(state, train_trials_only(data), Run(config, out, hooks=(), quiet=True), companions)
final = {k: v.detach().clone() for k, v in state.module.state_dict().items()}
torch.save({"initial": initial, "final": final}, out / f"rank{fabric.global_rank}-of-{devices}.pt")
