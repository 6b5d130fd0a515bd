"""GPU check: one command that checks the whole GPU stack and exits non-zero on any failure.

1. gru: ``nlbfab.models.gru.gru`` on CUDA (cuDNN's ``aten::gru``) against the hand-written CPU
   GRU, same random weights and SAE-like batch, float32 with TF32 off: outputs, final states and
   every gradient, for the encoder's bidirectional pair and a single GRU, with gradients
   recorded and under ``torch.no_grad()``.
2. lfads: LFADS's controller and generator as ``nlbfab.models.lfads_decoder``'s autograd
   Function (the decoder on every device) against the step-by-step loop autograd records (its
   reference), on the GPU at mc_maze's 5 ms sizes: outputs and every gradient, and each one's
   time; then an ensemble's 4 members through the Function at once, against the loop, and timed
   against the same members through it one after another.
3. train: synthesize mc_maze, preprocess mc_maze-20ms-val, then ``nlbfab-train`` a few epochs
   of the SAE in 32-true, bf16-mixed and 16-mixed, and of LFADS in 32-true and bf16-mixed: exit
   0, no warning from torch, finite and falling loss, checkpoints, a scored submission, all on
   the GPU.
4. ddp: DDP over every visible GPU (two or more): parameters equal on every rank after updates.
5. nlbfab-all: four tiny splits with ``--jobs-per-gpu 3``: exit 0, both submission files whole.
6. throughput: train trials/s on mc_maze shapes (``train_throughput.py``'s loop) of the SAE,
   fp32 and bf16 at 20 and 5 ms, and of LFADS, one model and an ensemble of 4.

Without a CUDA GPU every check is skipped ("needs a CUDA GPU"); ``--cpu`` runs their logic on
the CPU instead, which is how the tests check this script.

    .venv/bin/python benchmarks/gpu_check.py [--only gru,lfads,train,ddp,all,throughput] [--cpu]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import description, device_description, positive_int, run_main, save, table  # noqa: E402

CHECKS = ("gru", "lfads", "train", "ddp", "all", "throughput")
NEEDS_GPU = "needs a CUDA GPU"
SPLIT = "mc_maze-20ms-val"
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
TRAINED = [("sae", p) for p in PRECISIONS] + [("lfads", "32-true"), ("lfads", "bf16-mixed")]
GRU_CASES = {"pair": (False, True), "single": (False,)}  # the SAE's encoder pair, its decoder
GRU_BATCH, GRU_BINS, GRU_FEATURES, GRU_HIDDEN = 64, 35, 137, 64  # mc_maze at 20 ms
GRU_TOLERANCE = 1e-4  # largest difference / largest value: float32 rounding is ~1e-6 here, TF32 ~1e-3
SWEEP_DATASETS = ("mc_maze_small", "mc_rtt")
# (model, members, bin width, precision); an ensemble's members step together
THROUGHPUT = [("sae", 1, 20, "32-true"), ("sae", 1, 20, "bf16-mixed"), ("sae", 1, 5, "32-true"), ("sae", 1, 5, "bf16-mixed"),
              ("lfads", 1, 20, "32-true"), ("lfads", 1, 20, "bf16-mixed"), ("lfads", 4, 20, "bf16-mixed"),
              ("lfads", 1, 5, "32-true"), ("lfads", 1, 5, "bf16-mixed")]
# the decoder's comparison: LFADS's default sizes, a batch of 64 trials over mc_maze's 140 + 40 bins at 5 ms
DECODER_STEPS, DECODER_TRIALS, DECODER_MEMBERS = 180, 64, 4
DECODER_TOLERANCE = 1e-4  # largest difference / largest value, as the GRU's
# a warning torch's C++ side prints, e.g. "[W1204 17:11:11.345770898 RNN.cpp:1479] Warning: ..."
TORCH_WARNING = re.compile(r"\[W\d{4} ")
COMMAND_TIMEOUT = 600  # a command that hangs fails its row instead of the whole check


class CheckFailed(Exception):
    """A check ran and found something wrong; its message is the row's detail."""


@dataclass
class Row:
    """One line of the final table; ``check`` is the group that ``--only`` selects."""

    check: str
    name: str
    status: str = "PENDING"  # PENDING until run, then PASS, FAIL or SKIP
    detail: str = ""
    seconds: float = 0.0
    values: dict = field(default_factory=dict)


def plan(selected: list[str], cpu: bool, gpus: int) -> list[Row]:
    """Every row a run prints; rows that cannot run here are already SKIP, with the reason."""
    no_gpu = NEEDS_GPU if not (cpu or gpus) else ""
    rows = []
    if "gru" in selected:
        rows += [Row("gru", f"gru {case} {mode}", *_skip(no_gpu)) for case in GRU_CASES for mode in ("grad", "no_grad")]
    if "lfads" in selected:
        rows += [Row("lfads", name, *_skip(no_gpu)) for name in ("lfads decoder", f"lfads decoder x{DECODER_MEMBERS}")]
    if "train" in selected:
        for model, precision in TRAINED:
            fp16_on_cpu = cpu and precision == "16-mixed"
            why = no_gpu or ("CPUs have no float16 autocast: nlbfab-train refuses 16-mixed there" if fp16_on_cpu else "")
            rows.append(Row("train", training_name(model, precision), *_skip(why)))
    if "ddp" in selected:
        few = f"needs 2 or more GPUs ({gpus} visible)" if not cpu and gpus == 1 else ""
        rows.append(Row("ddp", "ddp", *_skip(no_gpu or few)))
    if any(r.check in ("train", "ddp") and r.status == "PENDING" for r in rows):  # both train on this split
        first = next(i for i, r in enumerate(rows) if r.check in ("train", "ddp"))
        rows.insert(first, Row("data", f"synth + prep {SPLIT}"))
    if "all" in selected:
        rows.append(Row("all", "nlbfab-all", *_skip(no_gpu)))
    if "throughput" in selected:
        rows += [Row("throughput", throughput_name(*case), *_skip(no_gpu)) for case in THROUGHPUT]
    return rows


def training_name(model: str, precision: str) -> str:
    return f"train {precision}" if model == "sae" else f"train {model} {precision}"


def throughput_name(model: str, members: int, bin_ms: int, precision: str) -> str:
    what = "" if model == "sae" else f"{model} " + (f"x{members} " if members > 1 else "")
    return f"throughput {what}{bin_ms} ms {precision}"


def _skip(reason: str) -> tuple[str, str]:
    return ("SKIP", reason) if reason else ("PENDING", "")


@dataclass(frozen=True)
class Context:
    """What the checks share: where they run and the folders and environment of the commands."""

    cpu: bool
    scale: str
    epochs: int
    trials: int
    workdir: Path

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.cpu else torch.device("cuda", 0)

    @property
    def accelerator(self) -> str:
        return "cpu" if self.cpu else "gpu"

    @property
    def homes(self) -> dict[str, Path]:
        return {"DATA_HOME": self.workdir / "dandi", "PREP_HOME": self.workdir / "prep",
                "RUNS_HOME": self.workdir / "runs"}

    @property
    def env(self) -> dict[str, str]:
        path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        return {**os.environ, **{k: str(v) for k, v in self.homes.items()}, "PYTHONPATH": path}


def run_command(ctx: Context, log_name: str, *args: str) -> str:
    """Run ``python -m nlbfab.cli ARGS`` (or this script, for DDP's workers) with the check's
    homes, logging to ``workdir/logs``. The interpreter running this check runs every command,
    so the torch checked is the torch that trains. Returns the output; exit != 0 fails."""
    logs = ctx.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, *args] if args[0].endswith(".py") else [sys.executable, "-m", "nlbfab.cli", *args]
    try:
        done = subprocess.run(command, cwd=ROOT, env=ctx.env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"{' '.join(args[:2])} did not finish in {COMMAND_TIMEOUT} s") from None
    output = done.stdout + done.stderr
    (logs / f"{log_name}.log").write_text(" ".join(command) + "\n" + output)
    if done.returncode != 0:
        last = [line for line in output.splitlines() if line.strip()][-1:] or ["no output"]
        raise CheckFailed(f"{' '.join(args[:2])} exited {done.returncode}: {last[0].strip()} "
                          f"(log: {logs / log_name}.log)")
    return output


# 1. the GRU ---------------------------------------------------------------------------------

@contextmanager
def tf32_off():
    """TF32 rounds matmul inputs to 10 bits, far beyond float32 tolerance; restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextmanager
def fused_gru_on_cpu():
    """Route ``gru`` on CPU tensors through its CUDA branch (``aten::gru``), holding that kernel to
    cuDNN's rule that a backward needs a forward run with ``train=True``, so that ``--cpu``
    checks the same code and the same flag as a GPU."""
    from nlbfab.models import gru as gru_module
    saved = gru_module.FUSED_DEVICES, gru_module.aten_gru

    def cudnn_rule(*args):
        outputs, h_n = saved[1](*args)
        if outputs.requires_grad and not args[6]:  # (input, hx, params, biases, layers, dropout, train, ...)
            def refuse(_):
                raise RuntimeError("cudnn RNN backward can only be called in training mode (cuDNN's rule, on the CPU)")
            outputs.register_hook(refuse)
            h_n.register_hook(refuse)
        return outputs, h_n

    gru_module.FUSED_DEVICES, gru_module.aten_gru = ("cpu",), cudnn_rule
    try:
        yield
    finally:
        gru_module.FUSED_DEVICES, gru_module.aten_gru = saved


def gru_inputs(gru_count: int, seed: int = 0) -> dict:
    """Random float32 GRU weights (PyTorch's initialisation), spike-count inputs, initial states
    and upstream gradients with the SAE's sizes on mc_maze at 20 ms."""
    g = torch.Generator().manual_seed(seed)
    h, bound = GRU_HIDDEN, 1 / math.sqrt(GRU_HIDDEN)
    shapes = {"w_ih": (3 * h, GRU_FEATURES), "w_hh": (3 * h, h), "b_ih": (3 * h,), "b_hh": (3 * h,)}
    weights = [{k: (torch.rand(s, generator=g) * 2 - 1) * bound for k, s in shapes.items()} for _ in range(gru_count)]
    return {"inputs": torch.poisson(torch.full((GRU_BATCH, GRU_BINS, GRU_FEATURES), 0.4), generator=g),
            "h0": torch.randn(gru_count, GRU_BATCH, h, generator=g) * 0.5, "weights": weights,
            "grad_outputs": torch.randn(gru_count, GRU_BATCH, GRU_BINS, h, generator=g),
            "grad_h_n": torch.randn(gru_count, GRU_BATCH, h, generator=g)}


def gru_results(case: dict, reverse: tuple[bool, ...], device, grad: bool) -> dict[str, torch.Tensor]:
    """``gru``'s outputs and final states on ``device`` and, with ``grad``, the gradients of
    ``<outputs, grad_outputs> + <h_n, grad_h_n>`` for the inputs, h0 and every weight (on the CPU)."""
    from nlbfab.models.gru import gru
    leaves = {"inputs": case["inputs"], "h0": case["h0"]}
    leaves |= {f"{k}[{d}]": w for d, weights in enumerate(case["weights"]) for k, w in weights.items()}
    leaves = {k: v.to(device, copy=True).requires_grad_(grad) for k, v in leaves.items()}
    weights = [{k: leaves[f"{k}[{d}]"] for k in case["weights"][d]} for d in range(len(reverse))]
    with torch.set_grad_enabled(grad):
        outputs, h_n = gru(leaves["inputs"], leaves["h0"], weights, reverse)
    results = {"outputs": outputs, "h_n": h_n}
    if grad:
        loss = (outputs * case["grad_outputs"].to(device)).sum() + (h_n * case["grad_h_n"].to(device)).sum()
        results |= {f"d {k}": g for k, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values())))}
    return {k: v.detach().cpu() for k, v in results.items()}


def check_gru(ctx: Context, reverse: tuple[bool, ...], grad: bool) -> tuple[str, dict]:
    """The GPU path (``--cpu``: ``aten::gru`` on the CPU) against the hand-written CPU GRU."""
    case = gru_inputs(len(reverse))
    reference = gru_results(case, reverse, "cpu", grad)
    with tf32_off(), fused_gru_on_cpu() if ctx.cpu else nullcontext():
        candidate = gru_results(case, reverse, ctx.device, grad)
    errors = {k: float((candidate[k] - v).abs().max() / v.abs().max().clamp_min(1e-30)) for k, v in reference.items()}
    worst = max(errors, key=errors.get)
    what = f"{'aten::gru' if ctx.cpu else 'cuDNN'} vs hand-written GRU, {len(errors)} tensors"
    if errors[worst] > GRU_TOLERANCE or not all(torch.isfinite(v).all() for v in candidate.values()):
        raise CheckFailed(f"{what}: {worst} differs by {errors[worst]:.2e} of its largest value (> {GRU_TOLERANCE:g})")
    return f"{what} equal (worst {worst}: {errors[worst]:.1e} of max), float32, TF32 off", errors


def run_gru(ctx: Context, rows: list[Row]) -> None:
    for row in rows:
        case, mode = row.name.split()[1:]
        _attempt(row, lambda: check_gru(ctx, GRU_CASES[case], mode == "grad"))


# 2. LFADS's decoder ----------------------------------------------------------------------------

def decoder_inputs(members: int = 1, seed: int = 0) -> tuple[list[torch.Tensor], list]:
    """``lfads_decoder.decode``'s arguments at LFADS's default sizes for ``members`` members over
    DECODER_STEPS steps and DECODER_TRIALS trials, sampling, with dropout masks, on the CPU: the
    tensors to differentiate (the controller's input, the initial states and factors, the
    weights) and the rest (masks, noise, clip)."""
    from nlbfab.models.lfads import HPARAMS
    con, gen, fac, co = (HPARAMS[k].default for k in ("con_dim", "gen_dim", "fac_dim", "co_dim"))
    steps, trials, clip = DECODER_STEPS, DECODER_TRIALS, HPARAMS["cell_clip"].default
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, fan_in=1):
        return torch.randn(*shape, generator=g) / math.sqrt(fan_in)

    def keep(*shape):
        return (torch.rand(*shape, generator=g) >= 0.2).float() / 0.8

    k = members
    differentiable = [leaf(k, steps, trials, 3 * con), leaf(k, trials, con).clamp(-clip, clip),
                      leaf(k, trials, gen).clamp(-clip, clip), leaf(k, trials, fac), leaf(k, 3 * con, fac, fan_in=fac),
                      leaf(k, 3 * con, con, fan_in=con), leaf(k, 2 * co, con, fan_in=con), leaf(k, 2 * co),
                      leaf(k, 3 * gen, co, fan_in=co), leaf(k, 3 * gen), leaf(k, 3 * gen, gen, fan_in=gen),
                      leaf(k, fac, gen, fan_in=gen)]
    rest = [keep(k, steps, trials, fac), keep(k, steps, trials, gen), torch.randn(k, steps, trials, co, generator=g),
            clip]
    return differentiable, rest


def decoder_results(decoder, case, device, timed: bool = True) -> tuple[dict[str, torch.Tensor], float]:
    """``decoder``'s outputs on ``device`` and the gradients of a loss weighing every output entry
    differently, on the CPU, and the median seconds of a forward and backward (of 5, after 2;
    of the one run where not ``timed``: a reference's values alone)."""
    differentiable, rest = case
    leaves = [x.to(device, copy=True).requires_grad_() for x in differentiable]
    rest = [x.to(device) if isinstance(x, torch.Tensor) else x for x in rest]
    g = torch.Generator().manual_seed(1)
    weights = None
    seconds = []
    for _ in range(7 if timed else 1):
        _synchronize(device)
        started = time.perf_counter()
        outputs = decoder(*leaves, *rest)
        if weights is None:
            weights = [torch.randn(x.shape, generator=g).to(device) for x in outputs]
        grads = torch.autograd.grad(sum((x * w).sum() for x, w in zip(outputs, weights)), leaves)
        _synchronize(device)
        seconds.append(time.perf_counter() - started)
    names = ["factors", "means", "stds", "inputs"] + [f"d input {k}" for k in range(len(leaves))]
    return {n: x.detach().cpu() for n, x in zip(names, [*outputs, *grads])}, statistics.median(seconds[2:] or seconds)


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def check_decoder(ctx: Context) -> tuple[str, dict]:
    """The Function against the step-by-step loop, both on ``ctx.device``, float32, TF32 off."""
    from nlbfab.models.lfads import _unroll
    from nlbfab.models.lfads_decoder import decode
    case = decoder_inputs()
    with tf32_off():
        reference, loop_seconds = decoder_results(_unroll, case, ctx.device)
        candidate, function_seconds = decoder_results(decode, case, ctx.device)
    worst, errors = _against_the_loop(reference, candidate)
    timing = {"function_ms": 1e3 * function_seconds, "loop_ms": 1e3 * loop_seconds}
    return (f"Function = autograd loop on {ctx.device.type} ({len(errors)} tensors, worst {worst}: "
            f"{errors[worst]:.1e} of max); forward + backward of {DECODER_TRIALS} trials x {DECODER_STEPS} steps: "
            f"Function {timing['function_ms']:.0f} ms, loop {timing['loop_ms']:.0f} ms", errors | timing)


def check_decoder_members(ctx: Context) -> tuple[str, dict]:
    """DECODER_MEMBERS members through the Function at once against the loop, and the Function's
    time for them at once against each member through it in turn (as LFADS's ensembles stepped
    before their members were batched)."""
    from nlbfab.models.lfads import _unroll
    from nlbfab.models.lfads_decoder import decode
    case = decoder_inputs(DECODER_MEMBERS)
    differentiable, (keep_factor, keep_gen, noise, clip) = case
    with tf32_off():
        reference, _ = decoder_results(_unroll, case, ctx.device, timed=False)
        candidate, together = decoder_results(decode, case, ctx.device)
        in_turn = sum(decoder_results(decode, ([x[k:k + 1] for x in differentiable], [
            keep_factor[k:k + 1], keep_gen[k:k + 1], noise[k:k + 1], clip]), ctx.device)[1]
            for k in range(DECODER_MEMBERS))
    worst, errors = _against_the_loop(reference, candidate)
    timing = {"together_ms": 1e3 * together, "in_turn_ms": 1e3 * in_turn}
    return (f"{DECODER_MEMBERS} members at once = autograd loop ({len(errors)} tensors, worst {worst}: "
            f"{errors[worst]:.1e} of max); forward + backward: at once {timing['together_ms']:.0f} ms, "
            f"one after another {timing['in_turn_ms']:.0f} ms", errors | timing)


def _against_the_loop(reference: dict, candidate: dict) -> tuple[str, dict]:
    """Each tensor's largest difference over its largest value, and the worst tensor's name;
    CheckFailed past DECODER_TOLERANCE or on a value that is not finite."""
    errors = {k: float((candidate[k] - v).abs().max() / v.abs().max().clamp_min(1e-30)) for k, v in reference.items()}
    worst = max(errors, key=errors.get)
    if errors[worst] > DECODER_TOLERANCE or not all(torch.isfinite(v).all() for v in candidate.values()):
        raise CheckFailed(f"the Function's {worst} differs from the loop's by {errors[worst]:.2e} of its largest "
                          f"value (> {DECODER_TOLERANCE:g})")
    return worst, errors


def run_lfads(ctx: Context, rows: list[Row]) -> None:
    _attempt(rows[0], lambda: check_decoder(ctx))
    _attempt(rows[1], lambda: check_decoder_members(ctx))


# 3. training runs -----------------------------------------------------------------------------

def run_data(ctx: Context, rows: list[Row]) -> None:
    def prepare():
        run_command(ctx, "synth-mc_maze", "synth", "--dataset", "mc_maze", "--scale", ctx.scale)
        run_command(ctx, "prep-mc_maze", "prep", "--split", SPLIT)
        return f"mc_maze at --scale {ctx.scale}, {SPLIT} preprocessed in {ctx.workdir}", {}
    _attempt(rows[0], prepare)


def check_training(ctx: Context, model: str, precision: str) -> tuple[str, dict]:
    """``nlbfab-train --model MODEL`` for ``ctx.epochs`` epochs; checks what the run folder holds."""
    import h5py
    tag = f"gpu-check-{model}-{precision}"
    output = run_command(ctx, f"train-{model}-{precision}", "train", "--split", SPLIT, "--model", model, "--max-epochs",
                         str(ctx.epochs), "--run-tag", tag, "--quiet", "--accelerator", ctx.accelerator,
                         "--precision", precision)
    warnings = [line for line in output.splitlines() if TORCH_WARNING.match(line)]
    if warnings:
        raise CheckFailed(f"torch printed {len(warnings)} warning(s), the first: {warnings[0]}")
    run_dir = ctx.homes["RUNS_HOME"] / tag / SPLIT
    for checkpoint in ("last.ckpt", "best.ckpt"):
        if not (run_dir / "checkpoints" / checkpoint).is_file():
            raise CheckFailed(f"no checkpoints/{checkpoint} in {run_dir}")
    history = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["history"]
    losses = [h["train_loss"] for h in history]
    if len(history) != ctx.epochs or not all(math.isfinite(h[k]) for h in history for k in ("train_loss", "val_loss")):
        raise CheckFailed(f"expected {ctx.epochs} epochs of finite losses, the checkpoint's history has {history}")
    if not losses[-1] < losses[0]:
        raise CheckFailed(f"train loss did not fall: {', '.join(f'{x:.4f}' for x in losses)}")
    device = json.loads((run_dir / "progress.json").read_text())["device"]
    if not device.startswith(ctx.device.type):
        raise CheckFailed(f"trained on {device}, not on {ctx.device.type}")
    summary = json.loads((run_dir / "metrics.json").read_text())
    co_bps = summary.get("metrics", {}).get("co-bps", math.nan)
    if not math.isfinite(co_bps):
        raise CheckFailed(f"metrics.json has no finite co-bps: {summary.get('metrics')}")
    with h5py.File(summary["submission"], "r") as h5:
        if "mc_maze_20" not in h5:
            raise CheckFailed(f"{summary['submission']} has no group mc_maze_20")
    return (f"{ctx.epochs} epochs on {device}: train loss {losses[0]:.4f} -> {losses[-1]:.4f}, checkpoints, "
            f"submission scored (co-bps {co_bps:.4f})", {"train_loss": losses, "co-bps": co_bps})


def run_train(ctx: Context, rows: list[Row]) -> None:
    cases = {training_name(*case): case for case in TRAINED}
    for row in rows:
        _attempt(row, lambda: check_training(ctx, *cases[row.name]))


# 4. DDP -------------------------------------------------------------------------------------

def ddp_worker(out: Path, cpu: bool) -> None:
    """One rank (Fabric's launcher starts the others with this same command line): three epochs
    of the SAE on the check's split, saving the rank's initial and final parameters."""
    from lightning_fabric import Fabric

    from nlbfab.config import homes
    from nlbfab.data import load_split, train_trials_only
    from nlbfab.splits import get_split
    from nlbfab.train import Run, TrainConfig, create_train_state, train_epoch
    devices = 2 if cpu else torch.cuda.device_count()
    fabric = Fabric(accelerator="cpu" if cpu else "cuda", devices=devices, strategy="ddp")
    fabric.launch()
    data = load_split(get_split(SPLIT), homes()).to(fabric.device)
    config = TrainConfig(split=SPLIT, batch_size=16, seed=5)
    state = create_train_state(fabric, config, data)
    initial = {k: v.detach().cpu().clone() for k, v in state.module.members[0].params.items()}
    for _ in range(3):
        train_epoch(state, train_trials_only(data), Run(config, out, hooks=(), quiet=True))
    final = {k: v.detach().cpu().clone() for k, v in state.module.members[0].params.items()}
    torch.save({"initial": initial, "final": final, "device": str(fabric.device)}, out / f"rank{fabric.global_rank}.pt")


def check_ddp(ctx: Context) -> tuple[str, dict]:
    out = ctx.workdir / "ddp"
    out.mkdir(parents=True, exist_ok=True)
    run_command(ctx, "ddp", str(Path(__file__).resolve()), "--ddp-worker", str(out), *(["--cpu"] if ctx.cpu else []))
    ranks = [torch.load(path, map_location="cpu") for path in sorted(out.glob("rank*.pt"))]
    expected = 2 if ctx.cpu else torch.cuda.device_count()
    if len(ranks) != expected:
        raise CheckFailed(f"{len(ranks)} ranks saved their parameters, expected {expected}")
    first = ranks[0]
    if all(torch.equal(first["initial"][k], first["final"][k]) for k in first["final"]):
        raise CheckFailed("no parameter changed in 3 epochs")
    for rank, other in enumerate(ranks[1:], 1):
        for name, value in first["final"].items():
            if not torch.equal(value, other["final"][name]):
                difference = float((value - other["final"][name]).abs().max())
                raise CheckFailed(f"{name} differs between rank 0 and rank {rank} by up to {difference:.2e}")
    devices = ", ".join(r["device"] for r in ranks)
    return (f"{len(ranks)} ranks ({'gloo' if ctx.cpu else 'nccl'}: {devices}), 3 epochs: all "
            f"{len(first['final'])} parameters equal on every rank, and trained", {})


def run_ddp(ctx: Context, rows: list[Row]) -> None:
    _attempt(rows[0], lambda: check_ddp(ctx))


# 5. nlbfab-all ------------------------------------------------------------------------------

def check_sweep(ctx: Context) -> tuple[str, dict]:
    """``nlbfab-all`` on both phases of SWEEP_DATASETS at 20 ms (tiny data), then its two
    submission files read back: every group, every array, its shape, finite rates."""
    import h5py
    import numpy as np

    from nlbfab.layout import Homes
    from nlbfab.splits import ALL_SPLITS
    from nlbfab.submission import REQUIRED, expected_shapes
    run_command(ctx, "synth-sweep", "synth", *[a for d in SWEEP_DATASETS for a in ("--dataset", d)], "--scale", "tiny")
    slots = ["--workers", "2"] if ctx.cpu else ["--jobs-per-gpu", "3"]
    output = run_command(ctx, "nlbfab-all", "all", "--datasets", ",".join(SWEEP_DATASETS), "--bins", "20",
                         "--run-tag", "gpu-check-all", "--max-epochs", str(ctx.epochs), *slots)
    splits = [s for s in ALL_SPLITS if s.dataset.name in SWEEP_DATASETS and s.bin_ms == 20]
    runs, prep = ctx.homes["RUNS_HOME"] / "gpu-check-all", ctx.homes["PREP_HOME"]
    for phase in ("val", "test"):
        path = runs / f"submission-{phase}.h5"
        wanted = [s for s in splits if s.phase == phase]
        with h5py.File(path, "r") as h5:
            if sorted(h5) != sorted(s.group for s in wanted):
                raise CheckFailed(f"{path.name} holds {sorted(h5)}, expected {sorted(s.group for s in wanted)}")
            for split in wanted:
                for key, shape in expected_shapes(split, Homes(ctx.homes["DATA_HOME"], prep, runs)).items():
                    if key in REQUIRED and (key not in h5[split.group] or h5[split.group][key].shape != shape
                                            or not np.isfinite(h5[split.group][key][()]).all()):
                        raise CheckFailed(f"{path.name}/{split.group}/{key} is missing, not {shape} or not finite")
    devices = sorted({json.loads((runs / s.name / "progress.json").read_text())["device"] for s in splits})
    if not all(d.startswith(ctx.device.type) for d in devices):
        raise CheckFailed(f"runs trained on {', '.join(devices)}, not on {ctx.device.type}")
    slots_line = next((line for line in output.splitlines() if " slots (" in line), "")
    return (f"exit 0, {slots_line.split(';')[0]}, trained on {', '.join(devices)}; "
            f"submission-val.h5 and -test.h5 hold every group and array", {})


def run_all(ctx: Context, rows: list[Row]) -> None:
    _attempt(rows[0], lambda: check_sweep(ctx))


# 6. throughput ------------------------------------------------------------------------------

def first_trials(data, train: int, evaluation: int):
    """``data`` (a ``SplitData``) cut to its first ``train`` train and ``evaluation`` eval trials."""
    return replace(data, train_heldin=data.train_heldin[:train], train_recon=data.train_recon[:train],
                   eval_heldin=data.eval_heldin[:evaluation], eval_recon=data.eval_recon[:evaluation],
                   target={k: v[:evaluation] for k, v in data.target.items()})


def check_throughput(ctx: Context, data, model: str, members: int, precision: str, device_name: str) -> tuple[str, dict]:
    """``train_throughput.py``'s nlbfab loop (``nlbfab_epochs``: train_epoch + validate under
    Fabric): the mean of ``ctx.epochs`` epochs after a warm-up."""
    from benchmarks.train_throughput import nlbfab_epochs
    trials = data.train_heldin.shape[0]
    epochs = nlbfab_epochs(data, ctx.epochs + 1, precision, False, ctx.device.type, ensemble=members, model=model)
    seconds = statistics.mean(epochs[1:])
    if not (math.isfinite(seconds) and seconds > 0):
        raise CheckFailed(f"an epoch took {seconds} s")
    detail = (f"{trials / seconds:.0f} train trials/s ({seconds:.3f} s an epoch with validation, {trials} trials, "
              f"mean of {ctx.epochs} after a warm-up) on {device_name}")
    return detail, {"trials/s": trials / seconds, "s/epoch": seconds}


def run_throughput(ctx: Context, rows: list[Row]) -> None:
    """On ``train_throughput.py``'s synthetic mc_maze tensors, the first ``--trials`` train trials."""
    from benchmarks.train_throughput import EVAL, TRAIN, synthetic_split
    device_name = device_description() if ctx.cpu else torch.cuda.get_device_name(0)
    trials = min(ctx.trials, TRAIN)
    evaluation = max(8, round(trials * EVAL / TRAIN))
    cache = {}

    def split_at(bin_ms: int):
        if bin_ms not in cache:
            cache.clear()  # one bin width's tensors on the device at a time
            cache[bin_ms] = first_trials(synthetic_split(bin_ms, ctx.device), trials, evaluation)
        return cache[bin_ms]

    cases = {throughput_name(*case): case for case in THROUGHPUT}
    for row in rows:
        model, members, bin_ms, precision = cases[row.name]
        _attempt(row, lambda: check_throughput(ctx, split_at(bin_ms), model, members, precision, device_name))


# the run ------------------------------------------------------------------------------------

def _attempt(row: Row, check) -> None:
    """Run one row's check: PASS with its detail, or FAIL with what went wrong; never raise."""
    started = time.perf_counter()
    try:
        row.detail, row.values = check()
        row.status = "PASS"
    except Exception as error:  # noqa: BLE001 - any failure is a FAIL row, the other checks go on
        row.status = "FAIL"
        message = next((line for line in str(error).splitlines() if line.strip()), "")
        row.detail = message if isinstance(error, CheckFailed) else f"{type(error).__name__}: {message}"
    row.seconds = time.perf_counter() - started
    print(f"{row.status} {row.name}: {row.detail} ({row.seconds:.1f} s)", flush=True)


RUNNERS = {"gru": run_gru, "lfads": run_lfads, "data": run_data, "train": run_train, "ddp": run_ddp, "all": run_all,
           "throughput": run_throughput}


def run_checks(rows: list[Row], ctx: Context) -> list[Row]:
    """Run every pending row, group by group in plan order; a group needing data that failed to
    prepare fails with that reason."""
    for group in dict.fromkeys(r.check for r in rows):
        pending = [r for r in rows if r.check == group and r.status == "PENDING"]
        data = [r for r in rows if r.check == "data"]
        if pending and group in ("train", "ddp") and data and data[0].status == "FAIL":
            for row in pending:
                row.status, row.detail = "FAIL", f"no data: {data[0].name} failed"
        elif pending:
            RUNNERS[group](ctx, pending)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--only", default=",".join(CHECKS),
                        help=f"comma-separated checks to run, of {','.join(CHECKS)} (default: all)")
    parser.add_argument("--cpu", action="store_true",
                        help="run every check's logic on the CPU (aten::gru vs the hand-written GRU, "
                             "--accelerator cpu, 2 gloo processes, --workers 2): tests this script without a GPU")
    parser.add_argument("--scale", choices=["tiny", "small", "full"], default="small",
                        help="synthetic mc_maze for the training runs and DDP (default: small)")
    parser.add_argument("--epochs", type=int, default=5,
                        help="epochs of each training run and nlbfab-all run; timed epochs of the throughput")
    parser.add_argument("--trials", type=positive_int, default=1721,
                        help="train trials for the throughput (default: mc_maze's 1721)")
    parser.add_argument("--workdir", type=Path,
                        help="folder for data, runs and logs (default: a temporary folder, removed at the end "
                             "unless --keep or a check failed); a given folder is never removed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", type=Path,
                        help="write the results here (default: benchmarks/results/gpu_check.json, "
                             "gpu_check-cpu.json with --cpu)")
    parser.add_argument("--ddp-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(CHECKS)
    if unknown:
        parser.error(f"unknown check(s) {', '.join(sorted(unknown))}: choose from {', '.join(CHECKS)}")
    if args.epochs < 3:  # with two, tiny data's first step can leave the loss where it was
        parser.error("--epochs must be 3 or more: the check asks the train loss to fall over them")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu:  # before anything asks CUDA, so that nothing here or in the commands uses a GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.ddp_worker:
        ddp_worker(args.ddp_worker, args.cpu)
        return 0
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rows = plan(args.only.split(","), args.cpu, gpus)
    print(f"device: {device_description()}; {gpus} CUDA GPU(s) visible"
          + ("; --cpu: every check on the CPU" if args.cpu else ""))
    if not args.cpu and not gpus:
        print(f"no CUDA GPU: every check below {NEEDS_GPU} and is skipped; --cpu runs their logic on the CPU")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nlbfab-gpu-check-"))
    started = time.perf_counter()
    try:
        run_checks(rows, Context(args.cpu, args.scale, args.epochs, args.trials, workdir.resolve()))
    finally:
        failed = any(r.status == "FAIL" for r in rows)
        if not (args.workdir or args.keep or failed):
            shutil.rmtree(workdir, ignore_errors=True)
        elif workdir.is_dir() and any(workdir.iterdir()):
            print(f"data, runs and logs kept in {workdir}")
    seconds = time.perf_counter() - started
    columns = ["check", "status", "detail"]
    print("\n" + table([{"check": r.name, "status": r.status, "detail": r.detail} for r in rows], columns))
    counts = {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in {seconds:.0f} s")
    result = {"device": device_description(), "gpus": gpus, "cpu": args.cpu, "seconds": seconds,
              "options": {k: str(v) for k, v in vars(args).items() if k != "ddp_worker"},
              "rows": [asdict(r) for r in rows]}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"saved {args.json or save('gpu_check-cpu' if args.cpu else 'gpu_check', result)}")
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
