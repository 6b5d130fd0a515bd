"""Run by test_ddp.py as a script: train a few epochs with Fabric on DEVICES CPU processes
(DDP over gloo when more than one) and save each rank's final parameters."""
import sys
from pathlib import Path

import torch
from lightning_fabric import Fabric

from nlbfab.config import split_file_names
from nlbfab.data import load_split
from nlbfab.splits import get_split
from nlbfab.train import TrainConfig, create_train_state, train_epoch

prep_home, devices, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
config = TrainConfig(split="mc_maze-20ms-val", hidden_size=16, batch_size=8, dropout=0.0, seed=5)
fabric = Fabric(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto")
fabric.launch()
data = load_split(get_split(config.split), prep_home, split_file_names())
module, optimizer, state, batch_rng = create_train_state(fabric, config, data)
initial = {k: v.detach().clone() for k, v in module.params.items()}
for epoch in range(3):
    train_epoch(fabric, module, optimizer, data, config, batch_rng, True, epoch, out)
final = {k: v.detach().clone() for k, v in module.params.items()}
torch.save({"initial": initial, "final": final}, out / f"rank{fabric.global_rank}-of-{devices}.pt")
