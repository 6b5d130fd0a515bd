"""Training throughput: nlbfab's loop vs a conventional PyTorch loop, side by side in one run.

Both train the same SAE (same sizes, initialisation scheme, batch size and optimizer) on
mc_maze-shaped tensors (1721 train / 574 eval trials, 137+45 neurons) at 20 ms (35+10 bins) and
5 ms (140+40 bins). The conventional loop is written the usual way: an ``nn.Module`` with
``torch.nn.GRU`` layers, ``F.poisson_nll_loss``, a ``DataLoader`` with 4 workers, validation
loss every epoch and a full evaluation (predict all trials, NLB co-bps) every 5 epochs.
nlbfab's loop is ``nlbfab.train.train_epoch`` + ``validate`` under Fabric, its data on the
device, with nlbfab's GRU (``nlbfab.models.gru``) and fused Poisson loss. Reports seconds per epoch, trials/s and achieved GFLOP/s
against the measured matmul peak, across --precision and with and without torch.compile.
Seconds per epoch are the mean of the timed epochs after one warm-up; the default 5 timed epochs
are one whole cycle of the conventional loop, so its full evaluation counts once in five, as in
training (a median, or fewer epochs, would leave it out).

    .venv/bin/python benchmarks/train_throughput.py [--epochs 5] [--bins 20 5] [--compile both]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (description, device_description, matmul_peak_gflops, positive_int,  # noqa: E402
                               run_main, save, table)
from lightning_fabric import Fabric  # noqa: E402
from nlb_tools.evaluation import bits_per_spike  # noqa: E402

from nlbfab.data import SplitData, train_trials_only  # noqa: E402
from nlbfab.memory import keep_freed_buffers  # noqa: E402
from nlbfab.splits import get_split  # noqa: E402
from nlbfab.train import Run, TrainConfig, create_train_state, evaluating, train_epoch, validate  # noqa: E402

TRAIN, EVAL, HELDIN, HELDOUT, HIDDEN, BATCH = 1721, 574, 137, 45, 64, 64


def synthetic_split(bin_ms: int, device) -> SplitData:
    """Random Poisson tensors with mc_maze's shapes at ``bin_ms`` (throughput needs no real data)."""
    g = torch.Generator().manual_seed(0)
    bins, fwd = 700 // bin_ms, 200 // bin_ms
    rate = 0.05 * bin_ms / 5
    spikes = lambda n, t, c: torch.poisson(torch.full((n, t, c), rate), generator=g)  # noqa: E731
    train = spikes(TRAIN, bins + fwd, HELDIN + HELDOUT)
    evaluation = spikes(EVAL, bins + fwd, HELDIN + HELDOUT)
    target = {"eval_spikes_heldout": evaluation[:, :bins, HELDIN:].numpy()}
    return SplitData(get_split(f"mc_maze-{bin_ms:02d}ms-val"), train[:, :bins, :HELDIN].contiguous(), train,
                     evaluation[:, :bins, :HELDIN].contiguous(), evaluation, HELDOUT, fwd, target).to(device)


def sae_flops(trials: int, bins: int, fwd: int, backward: bool) -> float:
    """Multiply-add FLOPs of the SAE's matmuls (encoder, decoder, readout); backward ~ 2x forward."""
    h = HIDDEN
    encoder = 2 * bins * 3 * h * (HELDIN + h) * 2
    decoder = (bins + fwd) * 3 * h * (1 + h) * 2
    readout = (bins + fwd) * h * (HELDIN + HELDOUT) * 2
    forward = trials * (encoder + decoder + readout + 2 * h * h * 2)
    return forward * (3 if backward else 1)


class ConventionalSAE(nn.Module):
    """The same SAE written as an nn.Module with nn.GRU layers."""

    def __init__(self, fwd_steps: int, dropout: float):
        super().__init__()
        self.fwd_steps, self.dropout = fwd_steps, nn.Dropout(dropout)
        self.encoder = nn.GRU(HELDIN, HIDDEN, batch_first=True, bidirectional=True)
        self.ic = nn.Linear(2 * HIDDEN, HIDDEN)
        self.decoder = nn.GRU(1, HIDDEN, batch_first=True)
        self.readout = nn.Linear(HIDDEN, HELDIN + HELDOUT)

    def forward(self, heldin):
        _, h_n = self.encoder(self.dropout(heldin))
        ic = self.dropout(self.ic(self.dropout(torch.cat([h_n[0], h_n[1]], -1))))
        zeros = heldin.new_zeros(heldin.shape[0], heldin.shape[1] + self.fwd_steps, 1)
        latents, _ = self.decoder(zeros, ic.unsqueeze(0).contiguous())
        return self.readout(latents), latents


def conventional_epochs(data: SplitData, epochs: int, precision: str, compiled: bool, device) -> list[float]:
    """Seconds per epoch of the conventional loop (validation every epoch, full evaluation every 5)."""
    torch.manual_seed(0)
    model = ConventionalSAE(data.fwd_steps, 0.2).to(device)
    if compiled:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-4)
    train_loader = DataLoader(TensorDataset(data.train_heldin.cpu(), data.train_recon.cpu()), batch_size=BATCH,
                              shuffle=True, num_workers=4)
    eval_loader = DataLoader(TensorDataset(data.eval_heldin.cpu(), data.eval_recon.cpu()), batch_size=BATCH,
                             num_workers=4)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    autocast = lambda: torch.autocast(str(device).split(":")[0], dtype=dtype, enabled=dtype is not None)  # noqa: E731
    times = []
    for epoch in range(epochs):
        started = time.perf_counter()
        model.train()
        for heldin, recon in train_loader:
            heldin, recon = heldin.to(device), recon.to(device)
            with autocast():
                logrates, _ = model(heldin)
            loss = F.poisson_nll_loss(logrates.float(), recon, log_input=True)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
        model.eval()
        with torch.no_grad(), autocast():
            val = [F.poisson_nll_loss(model(x.to(device))[0].float(), y.to(device), log_input=True) for x, y in eval_loader]
            if epoch % 5 == 0:  # full evaluation: predict every trial, score co-bps
                rates = torch.cat([model(x.to(device))[0] for x, _ in eval_loader]).float().exp()
                bits_per_spike(rates[:, :data.bins, HELDIN:].cpu().numpy().astype(np.float64),
                               data.target["eval_spikes_heldout"].astype(np.float64))
                torch.cat([model(x.to(device))[0] for x in data.train_heldin.split(BATCH)])
        float(torch.stack(val).mean())
        times.append(time.perf_counter() - started)
    return times


def nlbfab_epochs(data: SplitData, epochs: int, precision: str, compiled: bool, accelerator: str,
                  ensemble: int = 1, model: str = "sae") -> list[float]:
    """Seconds per epoch of nlbfab's loop: train_epoch + validate (co-bps every epoch), of one
    model or ``ensemble`` members; ``model`` with its defaults for mc_maze (the SAE's hidden size
    is this benchmark's own)."""
    config = TrainConfig(split=data.split.name, batch_size=BATCH, model=model,
                         hparams={"hidden_size": HIDDEN} if model == "sae" else {}, precision=precision,
                         ensemble=ensemble)
    fabric = Fabric(accelerator=accelerator, devices=1, precision=precision)
    keep_freed_buffers()  # as a run does (nlbfab.train.set_up)
    state = create_train_state(fabric, config, data)
    if compiled:
        state.module = torch.compile(state.module)
    run = Run(config, Path("."), hooks=(), quiet=True)
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        train_epoch(state, train_trials_only(data), run)
        with evaluating(state):
            validate(state.module, data)
        times.append(time.perf_counter() - started)
    return times


def main():
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--epochs", type=positive_int, default=5,
                        help="timed epochs per configuration, after 1 warm-up (a multiple of 5 is fair to the conventional loop)")
    parser.add_argument("--bins", type=int, nargs="+", choices=[5, 20], default=[20, 5])
    parser.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--compile", choices=["no", "yes", "both"], default="both")
    args = parser.parse_args()
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device("cuda:0" if accelerator == "cuda" else "cpu")
    peak = matmul_peak_gflops(str(device))
    print(f"device: {device_description()}; float32 matmul peak {peak:.1f} GFLOP/s")
    rows = []
    for bin_ms in args.bins:
        data = synthetic_split(bin_ms, device)
        flops = sae_flops(TRAIN, data.bins, data.fwd_steps, True) + sae_flops(EVAL, data.bins, data.fwd_steps, False)
        for precision in args.precision:
            for compiled in {"no": [False], "yes": [True], "both": [False, True]}[args.compile]:
                pair = {}
                for loop, run in (("nlbfab", lambda: nlbfab_epochs(data, args.epochs + 1, precision, compiled, accelerator)),
                                  ("conventional", lambda: conventional_epochs(data, args.epochs + 1, precision, compiled, device))):
                    seconds = statistics.mean(run()[1:])
                    pair[loop] = seconds
                    rows.append({"bins": f"{bin_ms} ms", "precision": precision, "compile": compiled, "loop": loop,
                                 "s/epoch": seconds, "trials/s": TRAIN / seconds, "GFLOP/s": flops / seconds / 1e9,
                                 "% peak": 100 * flops / seconds / 1e9 / peak})
                rows[-2]["speed-up"] = pair["conventional"] / pair["nlbfab"]
                print(table(rows[-2:], list(rows[-2])), flush=True)
    columns = ["bins", "precision", "compile", "loop", "s/epoch", "trials/s", "GFLOP/s", "% peak", "speed-up"]
    print("\n" + table(rows, columns))
    print(f"saved {save('train_throughput', {'device': device_description(), 'matmul_peak_gflops': peak, 'rows': rows})}")


if __name__ == "__main__":
    run_main(main)
