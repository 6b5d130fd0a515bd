"""The loop's hooks: explicit replacements of nlb-lightning's callbacks.

Each hook is a plain function ``hook(logger, data, predictions, epoch)`` called by the loop
every ``--log-every-n-epochs`` and at the end on the submitted model (its ``epoch`` one past the
last epoch's, so that TensorBoard's curves end on it); ``predictions`` comes from
``nlbfab.evaluation.predict``. They log to TensorBoard through Fabric's logger.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display: figures are rendered for TensorBoard only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import patheffects  # noqa: E402
import numpy as np  # noqa: E402
from mpl_toolkits.mplot3d.art3d import Line3DCollection  # noqa: E402

from nlbfab.data import SplitData  # noqa: E402
from nlbfab.evaluation import metrics  # noqa: E402

RASTER_TRIALS = 3
OUTLINE = [patheffects.withStroke(linewidth=3, foreground="k")]  # white lines seen on viridis' yellow too


def evaluation_hook(logger, data: SplitData, predictions, epoch: int) -> dict[str, float]:
    """NLB metrics (val phase) logged as ``nlb/{metric}``; returns them."""
    if data.split.phase != "val":
        return {}
    scores = metrics(data, predictions)
    logger.log_metrics({f"nlb/{k}": v for k, v in scores.items()}, step=epoch)
    return scores


def raster_figure(data: SplitData, predictions, trial: int):
    """Spikes beside inferred rates for one eval trial: time bins x neurons, with lines between
    held-in and held-out neurons (dashed) and between observed and forward bins (dotted).

    Sized for TensorBoard's image card, about 500 px wide: 6 x 3.3 inches at matplotlib's default
    100 dpi (600 x 330 px) with 9-11 pt text. Each neuron's rates are divided by its own maximum
    over the trial, so a low-rate neuron shows its time course as clearly as the few high-rate
    ones. The spikes keep counts on one scale, capped at the trial's 99th percentile (at least 1)
    so that one burst does not darken every single spike."""
    spikes = data.eval_recon[trial].cpu().numpy() if data.split.phase == "val" else data.eval_heldin[trial].cpu().numpy()
    rates = np.concatenate([
        np.concatenate([predictions["eval_rates_heldin"][trial], predictions["eval_rates_heldout"][trial]], -1),
        np.concatenate([predictions["eval_rates_heldin_forward"][trial], predictions["eval_rates_heldout_forward"][trial]], -1),
    ], 0)
    peak = rates.max(0)
    scaled = np.divide(rates, peak, out=np.zeros_like(rates), where=peak > 0)
    cap = max(1, int(np.ceil(np.percentile(spikes, 99))))
    # fixed margins: a layout engine measured every tick label at each draw, two thirds of the hook's time
    figure, axes = plt.subplots(1, 2, figsize=(6, 3.3), sharey=True,
                                gridspec_kw=dict(left=0.13, right=0.925, bottom=0.16, top=0.9, wspace=0.3))
    panels = ((axes[0], spikes, f"trial {trial}: spikes", cap, "spikes per bin", np.arange(0, cap + 1, max(1, cap // 4))),
              (axes[1], scaled, "inferred rates", 1, "rate / each neuron's max", [0, 0.5, 1]))
    for ax, values, title, top, label, ticks in panels:
        image = ax.imshow(values.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest", vmin=0, vmax=top)
        ax.axhline(data.heldin - 0.5, color="w", lw=1.5, ls="--", path_effects=OUTLINE)
        ax.axvline(data.bins - 0.5, color="w", lw=1.5, ls=":", path_effects=OUTLINE)
        ax.set_title(title, fontsize=11)
        ax.tick_params(labelsize=9)
        bar = figure.colorbar(image, ax=ax, fraction=0.08, pad=0.03, ticks=ticks,
                              extend="max" if values.max() > top else "neither")
        bar.set_label(label, fontsize=10, labelpad=2)
        bar.ax.tick_params(labelsize=9)
    axes[0].set_yticks([(data.heldin - 1) / 2, data.heldin + (data.heldout - 1) / 2],
                       [f"held-in\n{data.heldin}", f"held-out\n{data.heldout}"], fontsize=9)
    figure.supxlabel("time bin (forward bins after the dotted line)", fontsize=10)
    return figure


def raster_hook(logger, data: SplitData, predictions, epoch: int) -> None:
    for trial in range(min(RASTER_TRIALS, data.eval_heldin.shape[0])):
        figure = raster_figure(data, predictions, trial)
        logger.experiment.add_figure(f"raster/trial_{trial}", figure, global_step=epoch)
        plt.close(figure)


def trajectory_figure(data: SplitData, predictions):
    """Top 3 principal components of the latent states of all eval trials, start (o) and end (x)
    marked, coloured by condition where the split has conditions. Latents of fewer than 3
    dimensions (``--fac-dim 2``) keep the 3-D axes, the missing components at 0."""
    latents = predictions["eval_latents"]
    flat = latents.reshape(-1, latents.shape[-1])
    centred = flat - flat.mean(0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    explained = np.zeros(3)
    explained[:min(3, singular.size)] = (singular ** 2 / max(np.sum(singular ** 2), np.finfo(float).tiny))[:3]
    pcs = np.zeros((latents.shape[0], latents.shape[1], 3))
    pcs[..., :min(3, components.shape[0])] = (centred @ components[:3].T).reshape(latents.shape[0], latents.shape[1], -1)
    colours = _condition_colours(data, latents.shape[0])
    figure = plt.figure(figsize=(7, 6), constrained_layout=True)
    # One artist for all lines, one for all starts, one for all ends (three per trial were slow to
    # build and draw on mc_maze: benchmarks/README.md), drawn as the per-trial ones were: markers above the lines (no
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


def inputs_figure(data: SplitData, predictions):
    """A model's inferred inputs (``eval_inputs``): one panel of lines per input for each of the
    first eval trials, and below them each bin's root mean square over the inputs, averaged over
    all eval trials, where the model says pushes from outside land in a trial: at its task's events
    where they do, spread over the trial where they come at random (the dotted line starts the
    forward bins). Sized and lettered like ``raster_figure``, fixed margins."""
    inputs = predictions["eval_inputs"]
    trials, steps, count = inputs.shape
    shown = min(RASTER_TRIALS, trials)
    figure, axes = plt.subplots(shown + 1, 1, figsize=(6, 1.15 * (shown + 1) + 0.75), sharex=True,
                                gridspec_kw=dict(left=0.12, right=0.8, bottom=0.1, top=0.88, hspace=0.5))
    time = np.arange(steps)
    colours = plt.get_cmap("tab10")(np.arange(count) % 10)
    for trial, ax in enumerate(axes[:shown]):
        for k in range(count):
            ax.plot(time, inputs[trial, :, k], color=colours[k], lw=1.2, label=f"input {k + 1}")
        ax.set_title(f"trial {trial}", fontsize=10, pad=3)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.02, 1.05), fontsize=9, frameon=False,
                   handlelength=1.2)
    rms = np.sqrt(np.mean(inputs ** 2, axis=-1))
    axes[-1].plot(time, rms.mean(0), color="k", lw=1.5)
    axes[-1].set_title(f"root mean square over inputs, mean of {trials} trials", fontsize=10, pad=3)
    for ax in axes:
        ax.axvline(data.bins - 0.5, color="0.4", lw=1, ls=":")
        ax.axhline(0, color="0.8", lw=0.8, zorder=0)
        ax.tick_params(labelsize=9)
    figure.suptitle(f"inferred inputs of eval trials ({count})", fontsize=11)
    figure.supxlabel("time bin (forward bins after the dotted line)", fontsize=10)
    return figure


def inputs_hook(logger, data: SplitData, predictions, epoch: int) -> None:
    """``inputs_figure`` where the model infers inputs (``nlbfab.models``: ``inferred_inputs``)."""
    if "eval_inputs" not in predictions:
        return
    figure = inputs_figure(data, predictions)
    logger.experiment.add_figure("inputs/inferred", figure, global_step=epoch)
    plt.close(figure)


HOOKS = (evaluation_hook, raster_hook, trajectory_hook, inputs_hook)
