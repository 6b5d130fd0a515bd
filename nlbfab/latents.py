"""``--save-latents``: the submitted model's latents and inferred inputs of every trial, in a file.

The submission holds rates only; what a model learned (its latent states, LFADS's factors, and
the inputs it infers) is for the user's own analysis. ``latents.h5`` in the run folder holds
``train_latents`` and ``eval_latents``, ``(trials, bins + fwd_steps, latent_dim)``, in the
order of the split's train and eval tensors (and of the submission's rates), and, where the
model infers inputs, ``train_inputs`` and ``eval_inputs``, ``(trials, bins + fwd_steps,
inputs)``; its attributes name the split, the model and the member's seed.
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch

from nlbfab import layout
from nlbfab.data import SplitData
from nlbfab.evaluation import inference_batch


@torch.no_grad()
def predict_latents(forward, inputs, data: SplitData) -> dict[str, np.ndarray]:
    """``forward(heldin) -> (logrates, latents)`` and ``inputs(heldin)`` (or None) over every
    train and eval trial, in batches: the arrays of ``latents.h5``."""
    arrays = {}
    for prefix, heldin in (("train", data.train_heldin), ("eval", data.eval_heldin)):
        chunks = heldin.split(inference_batch(heldin.device))
        arrays[f"{prefix}_latents"] = torch.cat([forward(chunk)[1] for chunk in chunks]).float().cpu().numpy()
        if inputs is not None:
            arrays[f"{prefix}_inputs"] = torch.cat([inputs(chunk) for chunk in chunks]).float().cpu().numpy()
    return arrays


def write_latents(run_dir: Path, arrays: dict[str, np.ndarray], **attrs) -> Path:
    """``arrays`` and ``attrs`` to the run's ``latents.h5``, atomically (a temporary file, then a rename)."""
    path = layout.latents_file(run_dir)
    partial = layout.partial(path)
    with h5py.File(partial, "w") as h5:
        h5.attrs.update(attrs)
        for key, value in arrays.items():
            h5.create_dataset(key, data=value)
    os.replace(partial, path)
    return path
