"""The heap setting of training runs (``nlbfab.memory.keep_freed_buffers``) against glibc's
defaults: seconds and minor page faults per training step, and peak memory, side by side.

Each configuration runs in a process of its own (the setting cannot be undone in a process),
the two settings one after the other for each bin width and member count: K SAE members
(``--ensemble K``) on mc_maze-shaped tensors (``train_throughput.py``'s: batches of 64), a few
warm-up steps, then ``--steps`` timed training steps.

    .venv/bin/python benchmarks/memory.py [--bins 20 5] [--members 1 4 8] [--steps 8]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WARM_UP = 2


def measure(bin_ms: int, members: int, keep: bool, steps: int) -> dict:
    """Run in a child process: seconds and faults per step of ``members`` SAEs, and peak RSS."""
    import torch
    from lightning_fabric import Fabric

    from benchmarks.train_throughput import BATCH, HIDDEN, synthetic_split
    from nlbfab.memory import keep_freed_buffers
    from nlbfab.train import create_train_state, train_step
    from nlbfab.train_config import TrainConfig

    took_effect = keep_freed_buffers() if keep else False
    data = synthetic_split(bin_ms, torch.device("cpu"))
    config = TrainConfig(split=data.split.name, batch_size=BATCH, hparams={"hidden_size": HIDDEN}, ensemble=members)
    state = create_train_state(Fabric(accelerator="cpu", devices=1), config, data)
    generator = torch.Generator().manual_seed(0)

    def step():
        index = torch.randint(0, data.train_heldin.shape[0], (BATCH,), generator=generator)
        train_step(state, (data.train_heldin[index], data.train_recon[index]), config)

    for _ in range(WARM_UP):
        step()
    faults, started = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"took_effect": took_effect, "ms/step": 1000 * seconds / steps,
            "faults/step": (usage.ru_minflt - faults) / steps, "peak MiB": usage.ru_maxrss / 1024}


def child(bin_ms: int, members: int, keep: bool, steps: int) -> dict:
    command = [sys.executable, __file__, "--child", str(bin_ms), str(members), str(int(keep)), str(steps)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main():
    from benchmarks.common import device_description, save, table

    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--bins", nargs="+", type=int, choices=[5, 20], default=[20, 5])
    parser.add_argument("--members", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=8, help="Timed training steps per configuration.")
    parser.add_argument("--child", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.members) < 1 or args.steps < 1:
        parser.error("--members and --steps must be 1 or more")
    if args.child:
        print(json.dumps(measure(*args.child[:2], bool(args.child[2]), args.child[3])))
        return
    rows = []
    for bin_ms in args.bins:
        for count in args.members:
            default, kept = child(bin_ms, count, False, args.steps), child(bin_ms, count, True, args.steps)
            if not kept["took_effect"]:
                sys.exit("error: keep_freed_buffers() had no effect here (not glibc?): nothing to compare")
            rows.append({"bins": f"{bin_ms} ms", "K": count, "default ms/step": default["ms/step"],
                         "kept ms/step": kept["ms/step"], "speed-up": default["ms/step"] / kept["ms/step"],
                         "default faults/step": round(default["faults/step"]), "kept faults/step": round(kept["faults/step"]),
                         "default peak MiB": default["peak MiB"], "kept peak MiB": kept["peak MiB"]})
            print(table(rows[-1:], list(rows[-1])), flush=True)
    print(f"device: {device_description()}")
    print(table(rows, list(rows[0])))
    print(f"saved {save('memory', {'device': device_description(), 'steps': args.steps, 'rows': rows})}")


if __name__ == "__main__":
    main()
