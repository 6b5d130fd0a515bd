"""Hook cost: seconds per evaluation, raster, trajectory and inputs hook, against one training epoch.

Uses a preprocessed split (default mc_maze-20ms-val; make it with ``bin/nlbfab-synth --dataset
mc_maze --scale full`` and ``bin/nlbfab-prep --split mc_maze-20ms-val``).

    .venv/bin/python benchmarks/hook_cost.py [--split mc_maze-20ms-val] [--model sae] [--repeats 3]

The inputs hook draws only for a model that infers inputs (``--model lfads``), whose prediction
then includes them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import description, device_description, positive_int, run_main, save, table  # noqa: E402
from lightning_fabric import Fabric  # noqa: E402
from lightning_fabric.loggers import TensorBoardLogger  # noqa: E402

from nlbfab import config  # noqa: E402
from nlbfab.data import load_split, train_trials_only  # noqa: E402
from nlbfab.evaluation import predict  # noqa: E402
from nlbfab.hooks import evaluation_hook, inputs_hook, raster_hook, trajectory_hook  # noqa: E402
from nlbfab.splits import get_split  # noqa: E402
from nlbfab.train import (Run, TrainConfig, create_train_state, ensemble_forward, first_member_inputs,  # noqa: E402
                          train_epoch)
from nlbfab.train_config import with_batch_size  # noqa: E402


def timed(function, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main():
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--split", default="mc_maze-20ms-val")
    parser.add_argument("--model", default="sae")
    parser.add_argument("--repeats", type=positive_int, default=3)
    args = parser.parse_args()
    split = get_split(args.split)
    with tempfile.TemporaryDirectory() as logs:
        fabric = Fabric(accelerator="auto", devices=1, loggers=TensorBoardLogger(logs, name="hooks"))
        data = load_split(split, config.homes()).to(fabric.device)
        train_config = with_batch_size(TrainConfig(split=split.name, model=args.model), data.train_heldin.shape[0])
        state = create_train_state(fabric, train_config, data)
        module = state.module
        run = Run(train_config, Path(logs), hooks=(), quiet=True)
        epoch = timed(lambda: train_epoch(state, train_trials_only(data), run), args.repeats)
        module.eval()
        inputs = first_member_inputs(module, data.fwd_steps, [0])
        forward = ensemble_forward(module, data.fwd_steps, [0])
        predictions = predict(forward, data, inputs)
        rows = [{"what": "training epoch", "seconds": epoch, "of an epoch": 1.0}]
        rows.append({"what": "predict all trials", "seconds": timed(lambda: predict(forward, data), args.repeats)})
        if inputs is not None:
            rows.append({"what": "predict all trials, inferred inputs too",
                         "seconds": timed(lambda: predict(forward, data, inputs), args.repeats)})
        for hook in (evaluation_hook, raster_hook, trajectory_hook, inputs_hook):
            seconds = timed(lambda: hook(fabric.logger, data, predictions, 0), args.repeats)
            rows.append({"what": hook.__name__, "seconds": seconds})
        for row in rows:
            row["of an epoch"] = row["seconds"] / epoch
        fabric.logger.experiment.close()  # flush the event file before the folder goes
    print(f"device: {device_description()}; split {split.name} ({data.train_heldin.shape[0]} train trials), "
          f"model {args.model}")
    print(table(rows, ["what", "seconds", "of an epoch"]))
    results = {'device': device_description(), 'split': split.name, 'model': args.model, 'rows': rows}
    print(f"saved {save('hook_cost', results)}")


if __name__ == "__main__":
    run_main(main)
