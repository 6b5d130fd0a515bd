"""Under DDP (2 CPU processes, gloo) gradients really are synchronised: parameters stay the same
on both ranks and match a single-process run on the same global batches."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize("ensemble", ["1", "2"])
def test_ddp_ranks_agree_with_each_other_and_with_one_process(prepared, tmp_path, ensemble):
    script = Path(__file__).with_name("ddp_check.py")
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent), "OMP_NUM_THREADS": "1"}
    for devices in ("2", "1"):
        done = subprocess.run([sys.executable, str(script), str(prepared), devices, str(tmp_path), "sae",
                               '{"hidden_size": 16}', ensemble], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    rank0, rank1, single = (torch.load(tmp_path / name) for name in ("rank0-of-2.pt", "rank1-of-2.pt", "rank0-of-1.pt"))
    assert all(torch.equal(rank0["initial"][k], single["initial"][k]) for k in single["initial"])
    assert len(single["final"]) == 16 * int(ensemble)  # every member's 16 weights
    for k in range(int(ensemble)):  # every member did train
        key = f"members.{k}.params.readout_w"
        assert not torch.allclose(rank0["final"][key], rank0["initial"][key])
    rank0, rank1, single = rank0["final"], rank1["final"], single["final"]
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.allclose(rank0[name], single[name], atol=1e-5), name
