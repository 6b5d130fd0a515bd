"""Synthetic NLB sessions with known ground truth (pure numpy; writing NWB is ``synth_nwb``).

Each dataset keeps the structure of its real counterpart: trial fields and events, conditions
with unequal trial counts, behaviour with the dataset's lag, the train/val/test split and
held-in/held-out units. Spikes are Poisson draws at 1 ms from

    rate(t) = exp(latents(t) @ loadings + bias)        (spikes per ms)

bent smoothly onto a ceiling on realistic data (``rate_law``).

where ``latents(t)`` follows low-dimensional, condition-dependent dynamics and behaviour is a
noisy linear readout of the latents ``lag`` ms earlier: ``behavior(t) = latents(t - lag) @
readout``. The latents are kept, so the true rates of any trial can be rebuilt exactly.

With ``variability="low"`` the trials of one condition differ only by their timing and the
Poisson draws. ``"realistic"`` adds single-trial variability (see ``Variability``): slow noise and
input pulses along a few input directions of the latents (so in the rates and the behaviour), at
lower firing rates, which saturate as real neurons' do; on the maze datasets the population also
holds a posture after the reach.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter1d
from scipy.signal import lfilter, lfiltic

from nlbfab.errors import UserError
from nlbfab.splits import Dataset

LATENT_DIM = 8
LOADING_SD = 0.55  # s.d. of a unit's loading on one latent
POSTURE_MS = 200.0  # time constant of the maze latents' settling into a posture after movement onset
CEILING_SHARPNESS = 4.0  # how close to the ceiling rates follow the exponential (rate_law)
SCALES = ("tiny", "small", "full")
LAGS_MS = {"mc_maze": 100, "mc_rtt": 140, "area2_bump": -20, "dmfc_rsg": 0,
           "mc_maze_large": 120, "mc_maze_medium": 120, "mc_maze_small": 120}
# Behaviour is written only inside trials for these (as on DANDI for some sessions): the
# realistic case that trips nlb_tools on pandas >= 1.4 unless the loaded data is time-sorted.
TRIAL_ONLY_BEHAVIOR = ("mc_maze", "area2_bump", "mc_maze_large", "mc_maze_medium", "mc_maze_small")


@dataclass(frozen=True)
class Variability:
    """Single-trial variability. It enters the latents along ``input_dims`` random orthonormal
    directions (a few upstream inputs drive the population: what LFADS's inferred inputs model),
    runs through trials and gaps alike, and is sized relative to the RMS norm of the latents
    within the train file's trials:

    - slow noise: an Ornstein-Uhlenbeck process (time constant ``slow_ms``) along each input
      direction, which a model can follow from the spikes of a few bins;
    - input pulses: at Poisson times (``pulse_hz``), each a kick in a random input direction
      whose damped response peaks ``pulse_ms`` later (an alpha kernel): perturbations that no
      initial condition predicts. With ``ring_hz`` the response also turns at that frequency in
      each plane of a pair of input directions, as a kicked dynamical system rings (a damped
      rotation, its norm the alpha kernel's): what a model of the dynamics follows from the
      kick on, and a 50 ms smoothing kernel blurs;
    - ``rate_scale`` multiplies every unit's rate: fewer spikes a bin leave smoothing less to
      average, while a model of the dynamics pools over time and trials;
    - ``ceiling_hz``: rates bend onto this ceiling (``rate_law``). Without it the exponential
      sends a unit's rate to thousands of spikes a second whenever a pulse lands on a strong
      condition, and those few bins, which no neuron fires, outweigh all others in co-bps;
    - ``posture`` (maze datasets): after movement onset the preparatory dims settle (time
      constant ``POSTURE_MS``) into a condition's posture state of this norm, as motor cortex
      holds the arm at the target, instead of falling silent. Not variability, but what makes
      the 200 ms of forward bins, which follow the reach, predictable from the trial's condition
      and state (README: Synthetic NLB datasets).
    """

    input_dims: int
    slow: float  # RMS norm of the slow noise / RMS norm of the signal
    slow_ms: float
    pulse: float  # peak norm of a pulse's response / RMS norm of the signal
    pulse_hz: float
    pulse_ms: float
    rate_scale: float
    ring_hz: float = 0.0  # with it, input_dims must be even: its directions pair into planes
    posture: float = 0.0  # norm of the posture state (the preparatory state's is 1.2)
    ceiling_hz: float = np.inf


# low: today's data (none added, bit for bit); realistic: calibrated on mc_maze (README)
VARIABILITIES: dict[str, Variability | None] = {
    "low": None,
    "realistic": Variability(input_dims=4, slow=0.5, slow_ms=300.0, pulse=1.5, pulse_hz=2.0, pulse_ms=40.0,
                             rate_scale=0.5, posture=1.2, ceiling_hz=200.0, ring_hz=8.0),
}


@dataclass(frozen=True)
class Counts:
    """Units and trials of one synthetic dataset."""

    heldin: int
    heldout: int
    train: int
    val: int
    test: int
    none: int  # failed trials in the train file, split 'none'


def counts(dataset: Dataset, scale: str) -> Counts:
    """``full``: the real dataset's counts; ``small``: its units with an eighth of its trials
    (the demo: minutes, not tens of minutes); ``tiny``: a few units and trials, for tests."""
    if scale == "full":
        return Counts(dataset.heldin, dataset.heldout, dataset.train, dataset.val, dataset.test,
                      none=max(2, dataset.train // 40))
    if scale == "small":
        return Counts(dataset.heldin, dataset.heldout, max(40, dataset.train // 8), max(16, dataset.val // 8),
                      max(12, dataset.test // 8), none=2)
    if scale == "tiny":
        return Counts(heldin=12, heldout=4, train=40, val=16, test=12, none=2)
    raise UserError(f"unknown scale '{scale}': use one of {', '.join(SCALES)}")


@dataclass
class SessionFile:
    """The content of one NWB file: trials (times in s) and 1 ms latents from t = 0."""

    trials: pd.DataFrame
    latents: np.ndarray  # (ms, LATENT_DIM) float32
    behavior: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = field(default_factory=dict)
    # name -> (timestamps in s, data (samples, channels), channel names)
    fluctuation: Fluctuation | None = None  # realistic data, when generate is asked to keep it
    hidden: HiddenTest | None = None  # the test file: what DANDI's copy leaves out


@dataclass
class HiddenTest:
    """What the test file on DANDI leaves out and EvalAI keeps to score the test phase: every
    trial field (conditions for PSTHs, dmfc_rsg's timing) and the behaviour. The held-out units'
    spikes are drawn when the file is written (``synth_nwb``)."""

    trials: pd.DataFrame
    behavior: dict[str, tuple[np.ndarray, np.ndarray, list[str]]]


def rate_law(log_rates: np.ndarray, ceiling: float) -> np.ndarray:
    """``exp(log_rates)`` below ``ceiling`` (the same units), bent smoothly onto it above: a soft
    minimum of the two, ``(exp(-k z) + ceiling^-k)^(-1/k)`` with ``k = CEILING_SHARPNESS``. The
    exponential alone where the ceiling is infinite (low-variability data, as before it existed)."""
    if np.isinf(ceiling):
        return np.exp(log_rates)
    k = CEILING_SHARPNESS
    return np.exp(log_rates - np.logaddexp(0, k * (log_rates - np.log(ceiling))) / k)


@dataclass
class Truth:
    """What generated the spikes: all units' loadings, bias, held-out flags and rate ceiling."""

    loadings: np.ndarray  # (latents, units)
    bias: np.ndarray  # (units,) log spikes per ms
    heldout: np.ndarray  # (units,) bool
    readout: np.ndarray  # (latents, 2) latents -> behaviour
    lag_ms: int
    ceiling: float = np.inf  # spikes per ms

    def rates(self, latents: np.ndarray, units: np.ndarray | None = None) -> np.ndarray:
        """Expected spikes per ms, ``(ms, units)``, for latents ``(ms, latents)``; all units in
        order, or those indexed by ``units``."""
        loadings, bias = (self.loadings, self.bias) if units is None else (self.loadings[:, units], self.bias[units])
        return rate_law(latents @ loadings + bias, self.ceiling)


# ---------------------------------------------------------------------------------------------
# Trial tables: one function per task, returning times in ms from the trial's start.

def _unequal_conditions(rng, n_trials: int, n_conditions: int) -> np.ndarray:
    """Condition index per trial, drawn with unequal weights so counts differ between conditions
    (nlb_tools cannot save PSTH indices when every condition has the same trial count)."""
    weights = 1.0 + (np.arange(n_conditions) % 3)
    return rng.choice(n_conditions, size=n_trials, p=weights / weights.sum())


def _maze_trials(rng, n: int, n_types: int, test: bool) -> pd.DataFrame:
    cond = _unequal_conditions(rng, n, n_types * 3)
    target_on = 150 + rng.uniform(0, 100, n)
    delay = rng.choice([0, 300, 500, 700], n) + rng.uniform(0, 50, n)
    go_cue = target_on + delay
    rt = rng.uniform(250, 400, n)
    move = go_cue + rt
    t = pd.DataFrame({"start": 0.0, "stop": move + 800, "target_on_time": target_on,
                      "go_cue_time": go_cue, "move_onset_time": move})
    if test:
        return t
    version = cond % 3
    t["trial_type"] = cond // 3 + 1
    t["trial_version"] = version
    t["maze_id"] = t["trial_type"] * 10 + version
    t["success"] = True
    t["rt"] = rt
    t["delay"] = delay
    t["num_targets"] = np.where(version == 0, 1, 3)
    t["num_barriers"] = version * 2
    t["active_target"] = 0
    angle = 2 * np.pi * (cond // 3) / n_types
    t["target_pos"] = [np.stack([[100 * np.cos(a + k), 100 * np.sin(a + k)] for k in range(m)])
                       for a, m in zip(angle, t["num_targets"])]
    t["barrier_pos"] = [rng.uniform(-80, 80, (max(b, 1), 4)) if b else np.zeros((1, 4))
                        for b in t["num_barriers"]]
    t["_cond"] = cond
    return t


def _bump_trials(rng, n: int, n_dirs: int, test: bool) -> pd.DataFrame:
    cond = _unequal_conditions(rng, n, n_dirs * 2)
    passive = (cond % 2).astype(bool)
    target_on = 200 + rng.uniform(0, 200, n)
    go_cue = target_on + rng.uniform(300, 500, n)
    bump = target_on + rng.uniform(100, 250, n)
    move = np.where(passive, bump, go_cue + rng.uniform(150, 300, n))
    t = pd.DataFrame({"start": 0.0, "stop": move + 800, "target_on_time": target_on,
                      "go_cue_time": go_cue, "move_onset_time": move})
    if test:
        return t
    t["bump_time"] = np.where(passive, bump, np.nan)
    t["cond_dir"] = (cond // 2) * 360.0 / n_dirs
    t["ctr_hold_bump"] = passive
    t["ctr_hold"] = bump - target_on
    t["result"] = "R"
    t["_cond"] = cond
    return t


def _rsg_trials(rng, n: int, n_ts: int, test: bool) -> pd.DataFrame:
    group = _unequal_conditions(rng, n, 8)  # (is_eye, theta, is_short)
    is_eye, theta, is_short = group // 4, (group // 2) % 2 * 180.0, (group % 2).astype(bool)
    short_ts, long_ts = np.linspace(480, 800, n_ts + 2)[1:-1], np.linspace(800, 1200, n_ts + 2)[1:-1]
    k = rng.integers(0, n_ts, n)
    ts = np.where(is_short, short_ts[k], long_ts[k]).round()
    outlier = rng.random(n) < 0.03
    tp = np.where(outlier, ts * rng.uniform(0.4, 0.6, n), ts * (1 + 0.08 * rng.standard_normal(n))).round()
    ready = 1200 + rng.uniform(0, 300, n)
    set_ = ready + ts
    go = set_ + tp
    t = pd.DataFrame({"start": 0.0, "stop": go + 700, "ready_time": ready, "set_time": set_, "go_time": go})
    if test:
        return t
    t["is_eye"] = is_eye.astype(bool)
    t["theta"] = theta
    t["is_short"] = is_short
    t["ts"] = ts
    t["tp"] = tp
    t["is_outlier"] = outlier.astype(int)
    t["_cond"] = group * n_ts + k
    return t


def _rtt_trials(rng, n: int, test: bool) -> pd.DataFrame:
    stop = rng.uniform(600, 1200, n).round()
    t = pd.DataFrame({"start": 0.0, "stop": stop})
    if not test:
        t["target_pos"] = [rng.uniform(-100, 100, 2) for _ in range(n)]
        t["_cond"] = 0
    return t


def _task(dataset: Dataset, scale: str):
    """(trial table maker, gap between trials in ms) for the dataset's task."""
    full = scale == "full"
    name = dataset.name
    if name.startswith("mc_maze"):
        types = (36 if name == "mc_maze" else 9) if full else 2
        return (lambda rng, n, test: _maze_trials(rng, n, types, test)), 100
    if name == "area2_bump":
        return (lambda rng, n, test: _bump_trials(rng, n, 8 if full else 4, test)), 100
    if name == "dmfc_rsg":
        return (lambda rng, n, test: _rsg_trials(rng, n, 5 if full else 2, test)), 100
    return (lambda rng, n, test: _rtt_trials(rng, n, test)), 0


# ---------------------------------------------------------------------------------------------
# Latent dynamics: one function per task, from a trial row and times (ms from trial start).

def _condition_vectors(rng, n: int, dim: int, norm: float) -> np.ndarray:
    v = rng.standard_normal((n, dim))
    return norm * v / np.linalg.norm(v, axis=1, keepdims=True)


def _maze_latents(trial, t, cv):
    """Preparatory state during the delay, then rotational dynamics around movement onset; with
    ``cv["posture"]``, a posture state the preparatory dims settle into after it."""
    x = np.zeros((len(t), LATENT_DIM))
    c = int(trial["_cond"])
    since_target = np.clip(t - trial["target_on_time"], 0, None)
    since_move = t - trial["move_onset_time"]
    prep = (1 - np.exp(-since_target / 100)) * np.where(since_move > 0, np.exp(-np.clip(since_move, 0, None) / 150), 1)
    x[:, :4] = prep[:, None] * cv["prep"][c]
    if "posture" in cv:
        settled = 1 - np.exp(-np.clip(since_move, 0, None) / POSTURE_MS)
        x[:, :4] += settled[:, None] * cv["posture"][c]
    tau = np.clip(since_move + 100, 0, None)  # neural rotation leads movement by 100 ms
    envelope = (tau / 200) * np.exp(1 - tau / 200)
    for plane, omega in enumerate((2 * np.pi * 1.2e-3, 2 * np.pi * 2.0e-3)):
        a, b = cv["move"][c, 2 * plane], cv["move"][c, 2 * plane + 1]
        x[:, 4 + 2 * plane] = envelope * (a * np.cos(omega * tau) - b * np.sin(omega * tau))
        x[:, 5 + 2 * plane] = envelope * (a * np.sin(omega * tau) + b * np.cos(omega * tau))
    return x


def _bump_latents(trial, t, cv):
    """Direction-tuned kinematic drive after movement onset; passive bumps are brief and sharp."""
    x = np.zeros((len(t), LATENT_DIM))
    c = int(trial["_cond"])
    direction = np.deg2rad(trial["cond_dir"])
    tau = np.clip(t - trial["move_onset_time"], 0, None)
    width = 80 if trial["ctr_hold_bump"] else 150
    speed = (tau / width) * np.exp(1 - tau / width) * 1.5
    x[:, 0], x[:, 1] = speed * np.cos(direction), speed * np.sin(direction)
    x[:, 2:4] = np.gradient(speed)[:, None] * width * np.array([-np.sin(direction), np.cos(direction)])
    x[:, 4:] = speed[:, None] * cv["move"][c, :4]
    return x


def _rsg_latents(trial, t, cv):
    """Ready-set ramp measures ts; set-go traverses a curve at speed 1/tp (for tp-corr)."""
    x = np.zeros((len(t), LATENT_DIM))
    in_trial = (t >= 0) & (t < trial["stop"])
    ramp = np.clip((t - trial["ready_time"]) / trial["ts"], 0, 1) * (t < trial["set_time"])
    phase = np.clip((t - trial["set_time"]) / trial["tp"], 0, 1) * (t >= trial["set_time"])
    after_go = np.exp(-np.clip(t - trial["go_time"], 0, None) / 150)
    produce = (t >= trial["set_time"]) * after_go
    x[:, 0] = 1.5 * ramp
    x[:, 1] = produce * 1.2 * np.cos(np.pi * phase)
    x[:, 2] = produce * 1.2 * np.sin(np.pi * phase)
    x[:, 3] = produce * (2 * phase ** 2 - 1)
    context = np.array([0.6 if trial["is_eye"] else -0.6, 0.6 * np.cos(np.deg2rad(trial["theta"])),
                        0.5 if trial["is_short"] else -0.5, 0.0])
    x[:, 4:] = in_trial[:, None] * context
    return x


def _trial_latents(name: str):
    if name.startswith("mc_maze"):
        return _maze_latents
    return {"area2_bump": _bump_latents, "dmfc_rsg": _rsg_latents}[name]


# ---------------------------------------------------------------------------------------------

def _readout(name: str, rng) -> np.ndarray:
    """Latents -> 2-D velocity: maze sets read the movement dims (not the preparatory ones),
    area2_bump its kinematic dims, mc_rtt all of its smooth latents."""
    readout = (rng.standard_normal((LATENT_DIM, 2)) * 20).astype(np.float32)
    if name.startswith("mc_maze"):
        readout[:4] = 0
    elif name == "area2_bump":
        readout[:] = 0
        readout[0, 0] = readout[1, 1] = 30.0
    return readout


def _layout(trials: pd.DataFrame, gap_ms: float, tail_ms: float) -> tuple[pd.DataFrame, int]:
    """Place trials one after another; returns absolute times (whole ms, as recorded at 1 kHz)
    and the session length in ms."""
    duration = np.ceil(trials["stop"].to_numpy())
    offsets = np.concatenate([[gap_ms], gap_ms + np.cumsum(duration + gap_ms)[:-1]])
    placed = trials.copy()
    for col in [c for c in trials if c.endswith("_time")] + ["start", "stop"]:
        placed[col] = (trials[col] + offsets).round()
    return placed, int(placed["stop"].iloc[-1] + tail_ms)


def _fill_latents(name, placed, length, cv, rng) -> np.ndarray:
    if name == "mc_rtt":  # continuous self-paced reaching: one smooth latent process
        noise = rng.standard_normal((length, LATENT_DIM))
        smooth = gaussian_filter1d(noise, 80, axis=0)
        return (0.5 * smooth / smooth.std(axis=0)).astype(np.float32)
    latents = np.zeros((length, LATENT_DIM), np.float32)
    make = _trial_latents(name)
    bounds = np.append(placed["start"].to_numpy()[1:], length)
    for (_, trial), next_start in zip(placed.iterrows(), bounds):
        lo, hi = int(trial["start"]), int(min(next_start, length))  # a trial owns the gap after it
        t = np.arange(lo, hi) - trial["start"]
        local = trial.copy()
        for col in [c for c in trial.index if c.endswith("_time")] + ["stop"]:
            local[col] = trial[col] - trial["start"]
        latents[lo:hi] += make(local, t, cv).astype(np.float32)
    return latents


def _ornstein_uhlenbeck(rng, length: int, dims: int, tau_ms: float) -> np.ndarray:
    """``(length, dims)`` unit-variance OU process at 1 ms (AR(1)), started from its stationary law."""
    a = np.exp(-1 / tau_ms)
    noise = rng.standard_normal((length, dims))
    rest, _ = lfilter([np.sqrt(1 - a * a)], [1, -a], noise[1:], axis=0, zi=a * noise[:1])
    return np.concatenate([noise[:1], rest])


def pulse_filter(pulse_ms: float, ring_hz: float = 0.0) -> tuple[list, list]:
    """``lfilter``'s ``(b, a)`` that turns kicks into pulse responses: the alpha kernel (t / tau)
    exp(1 - t / tau), peaking ``pulse_ms`` after the kick; a double pole at exp(-1 / tau). With
    ``ring_hz`` the pole is complex, exp(-1 / tau + 2 pi i ring_hz / 1000), for kicks given as
    complex numbers (``planes``): the response turns at ``ring_hz``, its modulus unchanged."""
    r = np.exp(-1 / pulse_ms + 2j * np.pi * ring_hz / 1000) if ring_hz else np.exp(-1 / pulse_ms)
    return [0, np.e / pulse_ms * r], [1, -2 * r, r * r]


def planes(x: np.ndarray, ring_hz: float) -> np.ndarray:
    """``(..., input_dims)`` -> the complex ``(..., input_dims / 2)`` of its pairs of directions
    where pulses ring; ``x`` itself where they do not."""
    return x[..., 0::2] + 1j * x[..., 1::2] if ring_hz else x


def from_planes(z: np.ndarray, ring_hz: float) -> np.ndarray:
    """``planes``' inverse."""
    if not ring_hz:
        return z
    x = np.empty(z.shape[:-1] + (2 * z.shape[-1],))
    x[..., 0::2], x[..., 1::2] = z.real, z.imag
    return x


@dataclass
class Fluctuation:
    """A file's single-trial variability before it enters the latents: its slow noise and pulse
    kicks along the input directions, and the laws they were drawn from. What a forecast of the
    rates needs (``benchmarks/forecast.py``); ``latents`` is what the file's latents got."""

    slow: np.ndarray  # (ms, input_dims) the slow noise
    kicks: np.ndarray  # (ms, input_dims) the pulses' kicks, zero between them
    directions: np.ndarray  # (input_dims, LATENT_DIM) orthonormal rows
    variability: Variability
    slow_sd: float  # the slow noise's stationary s.d. along each input direction
    kick_norm: float  # the norm of every kick

    @cached_property
    def pulses(self) -> np.ndarray:
        """``(ms, input_dims)`` the kicks' responses."""
        v = self.variability
        return from_planes(lfilter(*pulse_filter(v.pulse_ms, v.ring_hz), planes(self.kicks, v.ring_hz), axis=0),
                           v.ring_hz)

    def latents(self) -> np.ndarray:
        """``(ms, LATENT_DIM)`` float32 to add to the latents."""
        return ((self.slow + self.pulses) @ self.directions).astype(np.float32)

    def futures(self, start: int, steps: int, samples: int, rng) -> np.ndarray:
        """``(samples, steps, LATENT_DIM)`` draws of ms ``start`` to ``start + steps`` given all
        before ``start``: the slow noise goes on from its last value and the pulses under way
        decay, while the slow noise's innovations and new kicks are drawn from their laws."""
        v = self.variability
        kicks = np.zeros((samples, steps, v.input_dims))
        for sample, count in enumerate(rng.poisson(v.pulse_hz * steps / 1000, samples)):
            np.add.at(kicks[sample], rng.integers(0, steps, count),
                      _condition_vectors(rng, count, v.input_dims, self.kick_norm))
        return self.continued(start, rng.standard_normal((samples, steps, v.input_dims)), kicks)

    def continued(self, start: int, innovations: np.ndarray, kicks: np.ndarray) -> np.ndarray:
        """The fluctuation from ms ``start`` on, ``(samples, steps, LATENT_DIM)``, given all before
        it, the slow noise's unit ``innovations`` and the ``kicks``, both ``(samples, steps,
        input_dims)``. With the file's own innovations and kicks it is the file's fluctuation."""
        v = self.variability
        a = np.exp(-1 / v.slow_ms)
        samples = len(innovations)
        slow_state = np.broadcast_to(a * self.slow[start - 1], (samples, 1, v.input_dims))
        slow, _ = lfilter([np.sqrt(1 - a * a) * self.slow_sd], [1, -a], innovations, axis=1, zi=slow_state)
        b, a_pulse = pulse_filter(v.pulse_ms, v.ring_hz)
        past_pulses, past_kicks = (planes(x[start - 2:start][::-1], v.ring_hz)  # latest first
                                   for x in (self.pulses, self.kicks))
        pulse_state = np.stack([lfiltic(b, a_pulse, past_pulses[:, d], past_kicks[:, d])
                                for d in range(past_pulses.shape[1])], -1)
        pulses, _ = lfilter(b, a_pulse, planes(kicks, v.ring_hz), axis=1,
                            zi=np.broadcast_to(pulse_state, (samples, *pulse_state.shape)))
        return (slow + from_planes(pulses, v.ring_hz)) @ self.directions


def _fluctuation(length: int, signal_rms: float, v: Variability, directions: np.ndarray, rng) -> Fluctuation:
    """Slow noise plus pulses along the orthonormal rows of ``directions: (v.input_dims, LATENT_DIM)``,
    sized relative to the latents' RMS norm ``signal_rms * sqrt(LATENT_DIM)``."""
    signal_norm = signal_rms * np.sqrt(LATENT_DIM)
    slow_sd = v.slow * signal_norm / np.sqrt(v.input_dims)
    slow = _ornstein_uhlenbeck(rng, length, v.input_dims, v.slow_ms) * slow_sd
    kicks = np.zeros((length, v.input_dims))
    times = rng.integers(0, length, rng.poisson(v.pulse_hz * length / 1000))
    np.add.at(kicks, times, _condition_vectors(rng, len(times), v.input_dims, v.pulse * signal_norm))
    return Fluctuation(slow, kicks, directions, v, slow_sd, v.pulse * signal_norm)


def _in_trials(placed: pd.DataFrame, length: int) -> np.ndarray:
    """``(length,)`` bool: the ms inside a trial."""
    inside = np.zeros(length, bool)
    for start, stop in zip(placed["start"].astype(int), np.ceil(placed["stop"]).astype(int)):
        inside[start:stop] = True
    return inside


def assign_splits(rng, conditions: np.ndarray, n_train: int, n_val: int) -> np.ndarray:
    """'train'/'val'/'none' labels; val takes two trials of every condition group where it can
    (nlb_tools' dmfc_rsg targets need >= 2 val trials per group), the rest at random."""
    n = len(conditions)
    labels = np.full(n, "train", dtype=object)
    order = rng.permutation(n)
    val = []
    for c in np.unique(conditions):
        members = [i for i in order if conditions[i] == c]
        if len(members) >= 4:
            val.extend(members[:2])
    val = val[:n_val]
    taken = set(val)
    rest = [i for i in order if i not in taken]
    val.extend(rest[: n_val - len(val)])
    labels[val] = "val"
    leftover = [i for i in order if labels[i] == "train"]
    labels[leftover[n_train:]] = "none"
    return labels


def generate(dataset: Dataset, scale: str = "tiny", seed: int = 0, variability: str = "low",
             keep_fluctuation: bool = False) -> tuple[dict[str, SessionFile], Truth]:
    """Synthesize the train and test files of ``dataset``; deterministic in ``seed``.
    ``variability``: a key of ``VARIABILITIES``. Its fluctuations draw from a random stream of
    their own, so ``"realistic"`` keeps the trials, units, conditions and loadings of ``"low"``;
    ``keep_fluctuation`` keeps them, as ``SessionFile.fluctuation``, for forecasts. The test
    file's ``hidden`` part (EvalAI's copy) draws from a stream of its own too.

    Returns ``({"train": SessionFile, "test": SessionFile}, Truth)``.
    """
    if variability not in VARIABILITIES:
        raise UserError(f"unknown variability '{variability}': use one of {', '.join(VARIABILITIES)}")
    n = counts(dataset, scale)
    rng = np.random.default_rng([seed, sum(map(ord, dataset.name))])
    fluctuation_rng = np.random.default_rng([seed, sum(map(ord, dataset.name)), 2])
    hidden_rng = np.random.default_rng([seed, sum(map(ord, dataset.name)), 4])  # the test file's hidden part
    units = n.heldin + n.heldout
    mean_hz = np.exp(rng.normal(np.log(8.0), 0.6, units))
    truth = Truth(
        loadings=(rng.standard_normal((LATENT_DIM, units)) * LOADING_SD).astype(np.float32),
        bias=np.log(mean_hz / 1000).astype(np.float32),
        heldout=np.arange(units) >= n.heldin,
        readout=_readout(dataset.name, rng),
        lag_ms=LAGS_MS[dataset.name],
    )
    cv = {"prep": _condition_vectors(rng, 200, 4, 1.2), "move": _condition_vectors(rng, 200, 4, 1.8)}
    v = VARIABILITIES[variability]
    if v is not None:  # one circuit for both files: its input directions, rates and postures
        directions = np.linalg.qr(fluctuation_rng.standard_normal((LATENT_DIM, v.input_dims)))[0].T
        truth.bias += np.float32(np.log(v.rate_scale))
        truth.ceiling = v.ceiling_hz / 1000
        if v.posture:
            posture_rng = np.random.default_rng([seed, sum(map(ord, dataset.name)), 3])
            cv["posture"] = _condition_vectors(posture_rng, 200, 4, v.posture)
    make_trials, gap = _task(dataset, scale)

    files = {}
    for which, n_trials in (("train", n.train + n.val + n.none), ("test", n.test)):
        trials = make_trials(rng, n_trials, False)
        if which == "train":
            trials["split"] = assign_splits(rng, trials["_cond"].to_numpy(), n.train, n.val)
        else:
            trials["split"] = "test"
        # Where behaviour covers only the trials, the session ends with the last trial, as the
        # hard real case does (unsorted loads then lose the last trial's data).
        tail = 0 if dataset.name in TRIAL_ONLY_BEHAVIOR else 1500
        placed, length = _layout(trials, gap, tail_ms=tail)
        latents = _fill_latents(dataset.name, placed, length, cv, rng)
        if v is not None:
            if which == "train":  # sizes set once, by the train file: one law for both files
                signal_rms = np.sqrt(np.mean(latents[_in_trials(placed, length)] ** 2))
            fluctuation = _fluctuation(length, signal_rms, v, directions, fluctuation_rng)
            latents += fluctuation.latents()
        hidden = None
        if which == "test":  # DANDI's test file carries only timing fields; EvalAI's copy all
            hidden = HiddenTest(placed, _behavior(dataset, placed, latents, truth, hidden_rng) if dataset.behavior else {})
            keep = ["start", "stop", "split"] + [c for c in placed if c.endswith("_time")]
            placed = placed[keep]
        files[which] = SessionFile(trials=placed, latents=latents, hidden=hidden)
        if v is not None and keep_fluctuation:
            files[which].fluctuation = fluctuation
        if which == "train" and dataset.behavior:
            files[which].behavior = _behavior(dataset, placed, latents, truth, rng)
    return files, truth


def _behavior(dataset, placed, latents, truth, rng):
    """Velocity = lagged latent readout + noise; position = its integral. In s and per s."""
    length = len(latents)
    lagged = np.zeros_like(latents)
    lag = truth.lag_ms
    if lag >= 0:
        lagged[lag:] = latents[: length - lag]
    else:
        lagged[:lag] = latents[-lag:]
    vel = lagged @ truth.readout
    vel += rng.normal(0, 0.05 * (vel.std() + 1e-6), vel.shape)
    pos = np.cumsum(vel, axis=0) / 1000
    if dataset.name in TRIAL_ONLY_BEHAVIOR:
        ms = np.concatenate([np.arange(int(s), int(np.ceil(e))) for s, e in zip(placed["start"], placed["stop"])])
    else:
        ms = np.arange(length)
    stem = dataset.behavior.split("_")[0]  # hand / finger
    return {f"{stem}_vel": (ms / 1000, vel[ms], ["x", "y"]), f"{stem}_pos": (ms / 1000, pos[ms], ["x", "y"])}


def poisson_spike_times(latents: np.ndarray, truth: Truth, units: np.ndarray, rng,
                        chunk_ms: int = 100_000) -> list[np.ndarray]:
    """Spike times in s for ``units`` (indices into the truth), drawn chunk by chunk at 1 ms."""
    found = [[] for _ in units]
    for start in range(0, len(latents), chunk_ms):
        draws = rng.poisson(truth.rates(latents[start:start + chunk_ms], units))
        ms, unit = np.nonzero(draws)
        ms = np.repeat(ms, draws[ms, unit]) + start
        unit = np.repeat(unit, draws[draws > 0])
        for u in range(len(units)):
            found[u].append(ms[unit == u])
    times = []
    for pieces in found:
        ms = np.concatenate(pieces)
        times.append(np.sort(ms + rng.uniform(0.05, 0.95, len(ms))) / 1000)
    return times
