"""The loop's hooks: explicit replacements of nlb-lightning's callbacks.

Each hook is a plain function ``hook(logger, data, predictions, epoch)`` called by the loop
every ``--log-every-n-epochs`` and at the end; ``predictions`` comes from
``nlbfab.evaluation.predict``. They log to TensorBoard through Fabric's logger.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display: figures are rendered for TensorBoard only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mpl_toolkits.mplot3d.art3d import Line3DCollection  # noqa: E402

from nlbfab.data import SplitData  # noqa: E402
from nlbfab.evaluation import metrics  # noqa: E402

RASTER_TRIALS = 3


def evaluation_hook(logger, data: SplitData, predictions, epoch: int) -> dict[str, float]:
    """NLB metrics (val phase) logged as ``nlb/{metric}``; returns them."""
    if data.split.phase != "val":
        return {}
    scores = metrics(data, predictions)
    logger.log_metrics({f"nlb/{k}": v for k, v in scores.items()}, step=epoch)
    return scores


def raster_figure(data: SplitData, predictions, trial: int):
    """Spikes beside inferred rates for one eval trial: time bins x neurons, with lines between
    held-in and held-out neurons and between observed and forward bins."""
    spikes = data.eval_recon[trial].cpu().numpy() if data.split.phase == "val" else data.eval_heldin[trial].cpu().numpy()
    rates = np.concatenate([
        np.concatenate([predictions["eval_rates_heldin"][trial], predictions["eval_rates_heldout"][trial]], -1),
        np.concatenate([predictions["eval_rates_heldin_forward"][trial], predictions["eval_rates_heldout_forward"][trial]], -1),
    ], 0)
    # fixed margins: a layout engine measured every tick label at each draw, two thirds of the hook's time
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True,
                                gridspec_kw=dict(left=0.08, right=0.96, bottom=0.12, top=0.92, wspace=0.22))
    for ax, values, title in ((axes[0], spikes, "spikes"), (axes[1], rates, "inferred rates")):
        image = ax.imshow(values.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
        ax.axhline(data.heldin - 0.5, color="w", lw=1, ls="--")
        ax.axvline(data.bins - 0.5, color="w", lw=1, ls=":")
        ax.set(title=f"eval trial {trial}: {title}", xlabel="time bin (forward after dotted line)")
        figure.colorbar(image, ax=ax, label="spikes per bin", fraction=0.08, pad=0.02)
    axes[0].set_ylabel(f"neuron (held-out above dashed line, {data.heldout})")
    return figure


def raster_hook(logger, data: SplitData, predictions, epoch: int) -> None:
    for trial in range(min(RASTER_TRIALS, data.eval_heldin.shape[0])):
        figure = raster_figure(data, predictions, trial)
        logger.experiment.add_figure(f"raster/trial_{trial}", figure, global_step=epoch)
        plt.close(figure)


def trajectory_figure(data: SplitData, predictions):
    """Top 3 principal components of the latent states of all eval trials, start (o) and end (x)
    marked, coloured by condition where the split has conditions."""
    latents = predictions["eval_latents"]
    flat = latents.reshape(-1, latents.shape[-1])
    centred = flat - flat.mean(0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    explained = singular ** 2 / np.sum(singular ** 2)
    pcs = (centred @ components[:3].T).reshape(latents.shape[0], latents.shape[1], -1)
    colours = _condition_colours(data, latents.shape[0])
    figure = plt.figure(figsize=(7, 6), constrained_layout=True)
    # One artist for all lines, one for all starts, one for all ends (three per trial took 3 s to
    # build and draw on mc_maze), drawn as the per-trial ones were: markers above the lines (no
    # depth sort of the three), ax.plot's capstyle, no depth shading as in a one-point scatter.
    ax = figure.add_subplot(projection="3d", computed_zorder=False)
    ax.add_collection3d(Line3DCollection(pcs, colors=colours, linewidths=0.8, alpha=0.7, capstyle="projecting"))
    for step, marker in ((0, "o"), (-1, "x")):
        ax.scatter(*pcs[:, step].T, color=colours, marker=marker, s=12, depthshade=False, zorder=3)
    ax.set(xlabel="PC 1", ylabel="PC 2", zlabel="PC 3")
    ax.set_title(f"latents of {latents.shape[0]} eval trials: {100 * explained[:3].sum():.0f}% variance in PCs 1-3 "
                 f"({', '.join(f'{100 * e:.0f}%' for e in explained[:3])})", fontsize=9)
    return figure


def _condition_colours(data: SplitData, n_trials: int):
    condition = np.zeros(n_trials)
    for index, trials in enumerate(data.target.get("eval_cond_idx", [])):
        condition[np.asarray(trials, int)] = index + 1
    span = max(condition.max(), 1)
    return plt.get_cmap("hsv" if span > 1 else "viridis")(condition / (span + 1))


def trajectory_hook(logger, data: SplitData, predictions, epoch: int) -> None:
    figure = trajectory_figure(data, predictions)
    logger.experiment.add_figure("latents/trajectories", figure, global_step=epoch)
    plt.close(figure)


HOOKS = (evaluation_hook, raster_hook, trajectory_hook)
