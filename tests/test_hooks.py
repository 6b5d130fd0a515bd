"""Raster figures read at a glance in TensorBoard's image card (about 500 px wide): every
neuron's inferred rates on its own colour scale, the scaling named, text large enough, the
held-in/held-out and observed/forward lines kept, no layout engine. The inferred inputs' figure
draws each input of each trial and their mean size, where the model infers inputs at all."""
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.text import Text

from nlbfab.data import SplitData
from nlbfab.hooks import inputs_figure, inputs_hook, raster_figure, trajectory_figure
from nlbfab.splits import get_split

HELDIN, HELDOUT, BINS, FWD = 137, 45, 35, 10  # mc_maze at 20 ms
CARD_PX = 500  # TensorBoard's image card width: figures are scaled to it


def _split_data(phase: str, spikes: np.ndarray) -> SplitData:
    """A two-trial split with mc_maze's sizes; ``spikes``: (trials, bins + fwd, heldin + heldout)."""
    recon = torch.as_tensor(spikes, dtype=torch.float32)
    heldin = recon[:, :BINS, :HELDIN]
    return SplitData(get_split(f"mc_maze-20ms-{phase}"), train_heldin=heldin, train_recon=recon, eval_heldin=heldin,
                     eval_recon=recon if phase == "val" else heldin, heldout=HELDOUT, fwd_steps=FWD)


def _predictions(rates: np.ndarray) -> dict[str, np.ndarray]:
    """``rates``: (trials, bins + fwd, heldin + heldout) in the layout of ``nlbfab.evaluation.predict``."""
    return {"eval_rates_heldin": rates[:, :BINS, :HELDIN], "eval_rates_heldout": rates[:, :BINS, HELDIN:],
            "eval_rates_heldin_forward": rates[:, BINS:, :HELDIN], "eval_rates_heldout_forward": rates[:, BINS:, HELDIN:]}


@pytest.fixture
def rates() -> np.ndarray:
    """One bump per neuron at a random time; neuron 0 fires at 30 spikes per bin, the rest at
    0.01-1: on one shared scale all but neuron 0 would be dark."""
    rng = np.random.default_rng(0)
    time = np.arange(BINS + FWD)[None, :, None]
    centre = rng.uniform(0, BINS + FWD, (2, 1, HELDIN + HELDOUT))
    gain = rng.uniform(0.01, 1, (2, 1, HELDIN + HELDOUT))
    gain[:, :, 0] = 30
    return (gain * (0.05 + np.exp(-0.5 * ((time - centre) / 3) ** 2))).astype(np.float32)


@pytest.fixture
def figure(rates):
    spikes = np.random.default_rng(1).poisson(rates.clip(max=3)).astype(np.float32)
    spikes[0, 5, 3] = 40  # one burst
    figure = raster_figure(_split_data("val", spikes), _predictions(rates), trial=0)
    figure.canvas.draw()  # what TensorBoard's add_figure does: render at the figure's own dpi
    yield figure
    plt.close(figure)


def _texts(figure) -> list[Text]:
    return [t for t in figure.findobj(Text) if t.get_visible() and t.get_text().strip()]


def test_each_neurons_rates_span_its_own_scale(figure, rates):
    shown = figure.axes[1].images[0]
    values = np.asarray(shown.get_array())  # (neurons, bins + fwd)
    assert shown.get_clim() == (0, 1)
    np.testing.assert_allclose(values.max(1), 1, rtol=1e-6)  # a 0.01-spikes-per-bin neuron reaches the top too
    assert values.min() >= 0
    # each neuron's time course, not just its peak: its rates divided by its own maximum
    np.testing.assert_allclose(values, (rates[0] / rates[0].max(0)).T, rtol=1e-6)
    quiet = np.argmin(rates[0].max(0))
    assert values[quiet].max() == pytest.approx(1) and values[quiet].min() < 0.2


def test_the_figure_names_its_scales(figure):
    text = " ".join(t.get_text() for t in _texts(figure))
    assert "each neuron's max" in text
    assert "spikes per bin" in text


def test_spike_counts_keep_one_scale_that_one_burst_does_not_set(figure):
    shown = figure.axes[0].images[0]
    low, high = shown.get_clim()
    assert low == 0 and 1 <= high < 40  # one bin of 40 spikes would leave single spikes dark
    assert np.asarray(shown.get_array()).max() == 40  # counts, not rescaled


def test_text_is_readable_at_the_card_width_and_inside_the_figure(figure):
    assert_readable_at_the_card_width(figure)


def assert_readable_at_the_card_width(figure):
    width, height = figure.canvas.get_width_height()
    assert width == pytest.approx(figure.get_figwidth() * plt.rcParams["figure.dpi"])  # the dpi add_figure renders at
    texts = _texts(figure)
    assert len(texts) > 10  # titles, colorbar labels, tick labels, the time-bin label
    for text in texts:
        shown_px = text.get_fontsize() * figure.dpi / 72 * CARD_PX / width
        assert shown_px >= 10, f"{text.get_text()!r}: {shown_px:.1f} px high in a {CARD_PX} px card"
    # with fixed margins, larger text must still fit: everything drawn lies inside the image
    drawn = figure.get_tightbbox(figure.canvas.get_renderer())  # inches
    assert drawn.x0 >= 0 and drawn.y0 >= 0 and drawn.x1 <= figure.get_figwidth() and drawn.y1 <= figure.get_figheight()


def test_keeps_the_heldout_and_forward_lines_and_fixed_margins(figure):
    assert figure.get_layout_engine() is None  # a layout engine cost two thirds of the hook's time
    for ax in figure.axes[:2]:  # spikes, rates (then their colorbars)
        styles = {(line.get_linestyle(), tuple(line.get_xdata()), tuple(line.get_ydata())) for line in ax.lines}
        assert ("--", (0, 1), (HELDIN - 0.5, HELDIN - 0.5)) in styles
        assert (":", (BINS - 0.5, BINS - 0.5), (0, 1)) in styles


def test_test_phase_shows_the_heldin_spikes_beside_all_rates(rates):
    spikes = np.random.default_rng(2).poisson(rates.clip(max=3)).astype(np.float32)
    figure = raster_figure(_split_data("test", spikes), _predictions(rates), trial=1)
    figure.canvas.draw()
    assert np.asarray(figure.axes[0].images[0].get_array()).shape == (HELDIN, BINS)
    assert np.asarray(figure.axes[1].images[0].get_array()).shape == (HELDIN + HELDOUT, BINS + FWD)
    plt.close(figure)


@pytest.fixture
def inputs() -> np.ndarray:
    """Five trials of 8 inferred inputs (mc_rtt's count), input 2 kicked at bin 10 of every trial."""
    inputs = np.random.default_rng(3).normal(0, 0.2, (5, BINS + FWD, 8)).astype(np.float32)
    inputs[:, 10, 2] += 2
    return inputs


def test_the_inputs_figure_draws_each_input_of_the_first_trials_and_their_mean_size(rates, inputs):
    figure = inputs_figure(_split_data("val", np.zeros_like(rates)), {"eval_inputs": inputs})
    figure.canvas.draw()
    assert figure.get_layout_engine() is None
    trial_axes, summary = figure.axes[:-1], figure.axes[-1]
    assert len(trial_axes) == 3  # the first three of five trials
    for trial, ax in enumerate(trial_axes):
        drawn = [line for line in ax.lines if line.get_linestyle() == "-" and len(line.get_xdata()) == BINS + FWD]
        assert len(drawn) == 8
        for k, line in enumerate(drawn):
            np.testing.assert_array_equal(line.get_ydata(), inputs[trial, :, k])
    (size,) = [line for line in summary.lines if len(line.get_xdata()) == BINS + FWD]
    np.testing.assert_allclose(size.get_ydata(), np.sqrt((inputs ** 2).mean(-1)).mean(0), rtol=1e-6)
    assert int(np.argmax(size.get_ydata())) == 10  # the kick stands out in the mean of all trials
    for ax in figure.axes:
        assert any(line.get_linestyle() == ":" and tuple(line.get_xdata()) == (BINS - 0.5, BINS - 0.5)
                   for line in ax.lines)
    assert "input 8" in [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert_readable_at_the_card_width(figure)
    plt.close(figure)


class FigureLog:
    """Fabric's TensorBoard logger as far as the hooks use it: ``experiment.add_figure``."""

    def __init__(self):
        self.experiment, self.figures = self, []

    def add_figure(self, tag, figure, global_step):
        self.figures.append((tag, global_step))


def test_the_inputs_hook_logs_only_where_the_model_infers_inputs(rates, inputs):
    data, predictions = _split_data("val", np.zeros_like(rates)), _predictions(rates)
    log = FigureLog()
    inputs_hook(log, data, predictions, epoch=4)  # the SAE's predictions: no eval_inputs
    assert log.figures == []
    inputs_hook(log, data, predictions | {"eval_inputs": inputs}, epoch=4)
    assert log.figures == [("inputs/inferred", 4)]


@pytest.mark.parametrize("dims", [1, 2, 3, 8])
def test_the_trajectory_figure_draws_latents_of_any_dimension_in_3d(rates, dims):
    # --fac-dim 1 or 2 used to fail in matplotlib: the figure needs three components
    rng = np.random.default_rng(1)
    latents = np.cumsum(rng.normal(size=(2, BINS + FWD, dims)), axis=1)
    figure = trajectory_figure(_split_data("val", rates), {"eval_latents": latents})
    ax = figure.axes[0]
    assert ax.name == "3d" and len(ax.collections) == 3  # the lines, the starts, the ends
    shares = [float(share) for share in ax.get_title().split("(")[1].rstrip(")").replace("%", "").split(", ")]
    assert len(shares) == 3 and all(share > 0 for share in shares[:dims]) and shares[dims:] == [0] * (3 - min(dims, 3))
    assert sum(shares) == pytest.approx(100, abs=1.5) if dims <= 3 else sum(shares) < 100
    plt.close(figure)
