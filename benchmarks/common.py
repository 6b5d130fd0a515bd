"""Helpers shared by the benchmark scripts: the device, timing, tables and JSON results."""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_description() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def matmul_peak_gflops(device: str, size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul throughput: the ceiling that achieved GFLOP/s is compared with."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - started) / 1e9


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns)]
    lines += ["  ".join(_cell(r.get(c)).rjust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return "-" if value is None else str(value)


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def add_workdir_options(parser) -> None:
    """``--workdir``, ``--datasets`` and ``--bins`` of the scripts that read a ``models.py --workdir``."""
    parser.add_argument("--workdir", type=Path, required=True, help="a models.py --workdir")
    parser.add_argument("--datasets", default="mc_maze", help="comma-separated (default mc_maze)")
    parser.add_argument("--bins", default="20", help="comma-separated bin widths: 5, 20 (default 20)")


def workdir_homes(args):
    """The ``Homes`` of ``args.workdir`` (its data, preprocessed splits and runs), the datasets and the bin widths."""
    from nlbfab.layout import Homes
    homes = Homes(args.workdir / "dandi", args.workdir / "prep", args.workdir / "runs")
    return homes, args.datasets.split(","), [int(b) for b in args.bins.split(",")]


def description(doc: str) -> str:
    """A script's ``--help`` description: its docstring's whole first paragraph (its first line
    alone ends mid-sentence)."""
    return " ".join(doc.split("\n\n")[0].split())


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a bad one is argparse's one ``error:`` line, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be 1 or more")
    return value


def run_main(main) -> None:
    """Run a script's ``main`` as nlbfab's commands run: a ``UserError`` (a wrong split, model or
    home) is one ``error:`` line and exit status 2, not a traceback; an nlbfab command it started
    that failed has printed its own ``error:`` line, and its exit status is passed on."""
    from nlbfab.errors import UserError
    try:
        status = main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except subprocess.CalledProcessError as error:
        sys.exit(error.returncode)
    sys.exit(status)
