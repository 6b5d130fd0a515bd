"""LFADS (Pandarinath et al. 2018) as pure functions, after lfads-torch's model.

Two bidirectional GRU encoders read the held-in spikes: one gives the posterior of the
initial condition (a Gaussian, with a Gaussian prior), the other, lagged, the controller's
input at every bin. Step by step, a controller GRU (fed that input and the last factors)
emits the posterior of an inferred input (with an AR(1) prior), and a generator GRU driven by
the inferred input, started from the initial condition, gives the factors and through a linear
readout the log-rates of all neurons, over the observed and the forward bins. Training samples
both posteriors and adds their KL terms, warmed up over epochs, and an L2 penalty on the
recurrent weights; coordinated dropout hides a share of the held-in inputs and lets the loss
of those entries alone train the model, so that it cannot learn to copy its input to its output.
Inference uses the posterior means.

Differences from lfads-torch, for speed on the CPU: the GRUs are PyTorch's (the reset gate
after the recurrent matmul, as ``torch.nn.GRU``), the encoders run on nlbfab's GRU kernel, and
the state clipping of the encoders acts on their initial states, which bounds every later state
as well (a GRU state is a convex combination of the last state and a tanh). The controller and
generator run as one autograd Function with a hand-written backward through time
(``nlbfab.models.lfads_decoder``), on a GPU as well, where it is faster than the loop autograd
records (``benchmarks/gpu_check.py`` compares the two there).

``apply_members`` and ``training_loss_members`` run an ensemble's members together: their weights
stacked (``(K, ...)``), every member's encoders in one call of the GRU kernel, controller and
generator in the Function with a member axis, the linear maps as batched matmuls; ``apply`` and
``training_loss`` are the one-member case of the same code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nlbfab.errors import UserError
from nlbfab.loss import poisson_nll
from nlbfab.models.dropout import spike_dropout
from nlbfab.models.gru import gru
from nlbfab.models.lfads_decoder import decode
from nlbfab.search_space import choice, loguniform, uniform
from nlbfab.train_config import Hyperparameter, Valid

POSITIVE, AT_LEAST_ONE, NON_NEGATIVE = Valid(low=0, low_open=True), Valid(low=1), Valid(low=0)
# defaults: lfads-torch's configs/model/nlb_mc_maze.yaml, but for the generator and factors, which
# take the size of its other NLB configs (100 and 40 rather than 200 and 100): on realistic
# synthetic mc_maze they score higher and cost less (benchmarks/README.md, "A generator of 100 units")
HPARAMS = {
    "ic_enc_dim": Hyperparameter(64, "Units of each direction of the initial-condition encoder.", AT_LEAST_ONE),
    "ci_enc_dim": Hyperparameter(64, "Units of each direction of the controller-input encoder.", AT_LEAST_ONE),
    "ci_lag": Hyperparameter(1, "Bins by which the controller's input lags the data.", NON_NEGATIVE),
    "con_dim": Hyperparameter(64, "Units of the controller.", AT_LEAST_ONE),
    "co_dim": Hyperparameter(4, "Inferred inputs.", AT_LEAST_ONE),
    "ic_dim": Hyperparameter(64, "Dimensions of the initial condition.", AT_LEAST_ONE),
    "gen_dim": Hyperparameter(100, "Units of the generator.", AT_LEAST_ONE),
    "fac_dim": Hyperparameter(40, "Factors.", AT_LEAST_ONE),
    "readin_dim": Hyperparameter(40, "With --with-splits: the inputs each split's read-in maps its held-in units to.",
                                 AT_LEAST_ONE, with_splits_only=True),
    "cd_rate": Hyperparameter(0.3, "Coordinated dropout: share of held-in inputs hidden in training.",
                              Valid(low=0, high=1, high_open=True)),
    "submit_passes": Hyperparameter(32, "The submission's rates: each member's mean over this many passes with the "
                                   "held-in inputs hidden as in training (--cd-rate), each pass its own mask; 1: "
                                   "one pass on every input.", AT_LEAST_ONE),
    "cell_clip": Hyperparameter(5.0, "Bound on the GRU states.", Valid(low=1)),
    "ic_post_var_min": Hyperparameter(1e-4, "Floor of the initial condition's posterior variance.", POSITIVE),
    "ic_prior_var": Hyperparameter(0.1, "Variance of the initial condition's prior.", POSITIVE),
    "co_prior_tau": Hyperparameter(10.0, "Initial time constant (bins) of the inferred inputs' AR(1) prior.", POSITIVE),
    "co_prior_nvar": Hyperparameter(0.1, "Initial noise variance of the inferred inputs' AR(1) prior.", POSITIVE),
    "kl_ic_scale": Hyperparameter(1e-7, "Weight of the initial condition's KL term.", NON_NEGATIVE),
    "kl_co_scale": Hyperparameter(1e-7, "Weight of the inferred inputs' KL term.", NON_NEGATIVE),
    "l2_scale": Hyperparameter(0.0, "Weight of the L2 penalty on the recurrent weights.", NON_NEGATIVE),
    "kl_start_epoch": Hyperparameter(0, "Epoch at which the KL weights start to rise.", NON_NEGATIVE),
    "kl_increase_epoch": Hyperparameter(80, "Epochs over which the KL weights rise to their full value.", NON_NEGATIVE),
    "l2_start_epoch": Hyperparameter(0, "Epoch at which the L2 weight starts to rise.", NON_NEGATIVE),
    "l2_increase_epoch": Hyperparameter(80, "Epochs over which the L2 weight rises to its full value.", NON_NEGATIVE),
}
# nlbfab-search's default space (README: Hyperparameter search): the regularisers lfads-torch tunes
# on NLB (dropout, coordinated dropout, KL and L2 weights) and the learning rate, around the
# defaults above, and the factors: every unit's read-out weighs each factor, and on few trials
# those weights overfit (on realistic synthetic mc_maze_small 8 factors scored 3.5 points of the
# oracle's co-bps above 40: benchmarks/README.md, "Fewer factors"); the other sizes keep their
# per-dataset defaults
SEARCH_SPACE = {
    "fac_dim": choice(8, 16, 24, 40),
    "learning_rate": loguniform(2e-3, 1e-2),
    "dropout": uniform(0.0, 0.5),
    "cd_rate": uniform(0.1, 0.5),
    "kl_ic_scale": loguniform(1e-8, 1e-5),
    "kl_co_scale": loguniform(1e-8, 1e-5),
    "l2_scale": loguniform(1e-6, 1e-3),
}
# the weights' average (--average-decay) raised co-bps and fp-bps on every realistic synthetic dataset
# (benchmarks/README.md, "The weights' average")
AVERAGE_DECAY = 0.995
# training on the eval trials' held-in spikes as well raised co-bps on realistic synthetic mc_maze_small
# and mc_maze_medium by 6-7 points of the oracle's (benchmarks/README.md, "The eval trials' held-in spikes")
TRAIN_EVAL_HELDIN = True
# --with-splits: read-ins and read-outs per split around shared encoders, controller and generator
SHARES_ACROSS_SPLITS = True
# lfads-torch's sizes for the other datasets (its configs/model/nlb_*.yaml, found by population-based
# training on the 5 ms splits); mc_maze keeps the defaults above. mc_rtt has no conditions (self-paced
# reaches to random targets), so more of its dynamics come in as inputs: 8 inferred inputs rather than
# lfads-torch's 4 (benchmarks/README.md: 0.90-0.93 co-bps against 0.83-0.89 on realistic synthetic data)
_FIVE_MS_SIZES = {"ic_enc_dim": 100, "ci_enc_dim": 80, "con_dim": 80, "ic_dim": 100, "gen_dim": 100, "fac_dim": 40}
DATASET_DEFAULTS = {
    **{name: _FIVE_MS_SIZES for name in ("mc_maze_large", "mc_maze_medium", "mc_maze_small", "area2_bump")},
    "mc_rtt": {**_FIVE_MS_SIZES, "co_dim": 8},
    "dmfc_rsg": {**_FIVE_MS_SIZES, "ci_enc_dim": 64, "con_dim": 64, "kl_ic_scale": 3e-7, "kl_co_scale": 3e-7,
                 "l2_scale": 1e-3},
}
# what init stores besides tensors: read back by apply and training_loss from the params dict
SETTINGS = ("ci_lag", "cell_clip", "ic_post_var_min", "cd_rate", "submit_passes", "kl_ic_scale", "kl_co_scale",
            "l2_scale", "kl_start_epoch", "kl_increase_epoch", "l2_start_epoch", "l2_increase_epoch")
ENCODERS = ("ic_enc_fwd", "ic_enc_bwd", "ci_enc_fwd", "ci_enc_bwd")


def _normal(generator, shape, fan_in):
    """lfads-torch's variance scaling: N(0, 1 / fan_in)."""
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def _gru_weights(generator, inputs: int, hidden: int, fan: int | None = None) -> dict[str, torch.Tensor]:
    """A GRU's weights in PyTorch's (reset, update, new) order; biases as lfads-torch's: the
    reset and update gates' input bias at 1, the rest 0. Encoders scale both matrices by
    ``inputs + hidden`` (``fan``)."""
    b_ih = torch.cat([torch.ones(2 * hidden), torch.zeros(hidden)])
    return {"w_ih": _normal(generator, (3 * hidden, inputs), fan or inputs),
            "w_hh": _normal(generator, (3 * hidden, hidden), fan or hidden), "b_ih": b_ih}


def init(sizes, seed: int, ic_enc_dim: int, ci_enc_dim: int, ci_lag: int, con_dim: int, co_dim: int,
         ic_dim: int, gen_dim: int, fac_dim: int, readin_dim: int, **settings) -> dict[str, torch.Tensor]:
    """Parameters for ``sizes`` (``nlbfab.models.Sizes``); the scalar ``settings`` (clip,
    KL and L2 weights and warm-ups, coordinated dropout) ride along as 0-d buffers of the
    params dict, so that ``apply`` and ``training_loss`` stay functions of ``params`` alone.
    With ``sizes.companions`` (``--with-splits``) every split, its own included, gets a read-in
    (``readin{k}_w``: its held-in units to ``readin_dim`` inputs) and the companions a read-out
    each (``readout{k}_w``, k from 1): lfads-torch's multisession LFADS."""
    shortest = min(s.bins for s in (sizes, *sizes.companions))
    if ci_lag >= shortest:  # the controller would see nothing of a trial
        which = "the shortest split's" if sizes.companions else "the split's"
        raise UserError(f"--ci-lag {ci_lag}: must be below {which} {shortest} observed bins")
    g = torch.Generator().manual_seed(seed)
    n_in, neurons = (readin_dim if sizes.companions else sizes.heldin), sizes.heldin + sizes.heldout
    params = {}
    for name, hidden in (("ic_enc_fwd", ic_enc_dim), ("ic_enc_bwd", ic_enc_dim),
                         ("ci_enc_fwd", ci_enc_dim), ("ci_enc_bwd", ci_enc_dim)):
        params |= {f"{name}_{k}": v for k, v in _gru_weights(g, n_in, hidden, n_in + hidden).items()}
        params[f"{name}_h0"] = torch.zeros(hidden)
    params["ic_w"], params["ic_b"] = _normal(g, (2 * ic_dim, 2 * ic_enc_dim), 2 * ic_enc_dim), torch.zeros(2 * ic_dim)
    params["g0_w"], params["g0_b"] = _normal(g, (gen_dim, ic_dim), ic_dim), torch.zeros(gen_dim)
    params |= {f"con_{k}": v for k, v in _gru_weights(g, 2 * ci_enc_dim + fac_dim, con_dim).items()}
    params["con_h0"] = torch.zeros(con_dim)
    params["co_w"], params["co_b"] = _normal(g, (2 * co_dim, con_dim), con_dim), torch.zeros(2 * co_dim)
    params |= {f"gen_{k}": v for k, v in _gru_weights(g, co_dim, gen_dim).items()}
    params["fac_w"] = _normal(g, (fac_dim, gen_dim), gen_dim)
    params["readout_w"] = _normal(g, (neurons, fac_dim), fac_dim)
    params["readout_b"] = torch.log(sizes.mean_counts.clamp_min(1e-4)).float()
    if sizes.companions:
        params |= _session_maps(g, sizes, readin_dim, fac_dim)
    params["ic_prior_mean"] = torch.zeros(ic_dim)
    params["co_prior_logtau"] = torch.full((co_dim,), math.log(settings.pop("co_prior_tau")))
    params["co_prior_lognvar"] = torch.full((co_dim,), math.log(settings.pop("co_prior_nvar")))
    params["ic_prior_logvar"] = torch.full((ic_dim,), math.log(settings.pop("ic_prior_var")))
    params |= {name: torch.tensor(float(value)) for name, value in {"ci_lag": ci_lag, **settings}.items()}
    return params


def _session_maps(g, sizes, readin_dim: int, fac_dim: int) -> dict[str, torch.Tensor]:
    """Each split's read-in (the run's split's is session 0) and each companion's read-out, the
    read-outs' biases at the log of each neuron's mean count, like the run's split's."""
    params = {}
    for k, split in enumerate((sizes, *sizes.companions)):
        params[f"readin{k}_w"] = _normal(g, (readin_dim, split.heldin), split.heldin)
        params[f"readin{k}_b"] = torch.zeros(readin_dim)
        if k:
            params[f"readout{k}_w"] = _normal(g, (split.heldin + split.heldout, fac_dim), fac_dim)
            params[f"readout{k}_b"] = torch.log(split.mean_counts.clamp_min(1e-4)).float()
    return params


FIXED = ("ic_prior_logvar", *SETTINGS)  # not trained: lfads-torch keeps the IC prior's variance fixed


def _stacked(members: list[dict]) -> dict[str, torch.Tensor]:
    """K members' parameter dicts as one dict of ``(K, ...)`` tensors (one member's as views)."""
    if len(members) == 1:
        return {name: value[None] for name, value in members[0].items()}
    return {name: torch.stack([m[name] for m in members]) for name in members[0]}


def _setting(params, name: str) -> float:
    """A setting of stacked ``params`` as a number: the run's, the same for all its members."""
    return float(params[name].reshape(-1)[0])


def _linear(x, w, b=None):
    """``F.linear`` with each member's weights: ``x (K, ..., in)``, ``w (K, out, in)``, ``b (K,
    out)`` -> ``(K, ..., out)``, one batched matmul."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    y = torch.bmm(flat, w.mT) if b is None else torch.baddbmm(b[:, None], flat, w.mT)
    return y.view(*x.shape[:-1], w.shape[-2])


def _read_in(params, heldin, session: int, dropout: float, training: bool):
    """The encoders' input: the held-in spikes ``(K, trials, bins, heldin)`` under spike dropout
    (which draws only for nonzero counts on a CPU), through the session's read-in where there are
    companion splits."""
    x = spike_dropout(heldin, dropout, training)
    if f"readin{session}_w" in params:
        x = _linear(x, params[f"readin{session}_w"], params[f"readin{session}_b"])
    return x


def _encode(params, x, dropout: float, training: bool):
    """Posterior of the initial condition ``(mean, std)``, both ``(K, trials, ic_dim)``, and the
    controller's input ``(K, bins, trials, 2 ci_enc_dim)`` (time before trials, as the decoder
    takes it), lagged by ``ci_lag`` bins, from the
    encoders' input ``x: (K, trials, bins, inputs)`` (``_read_in``) and stacked ``params``.
    Every member's encoders step together in the GRU kernel."""
    clip, lag = _setting(params, "cell_clip"), int(_setting(params, "ci_lag"))
    members, trials = x.shape[:2]
    same = params["ic_enc_fwd_w_hh"].shape == params["ci_enc_fwd_w_hh"].shape
    groups = [ENCODERS] if same else [ENCODERS[:2], ENCODERS[2:]]  # equal sizes: all four in one kernel call
    outputs, finals = {}, {}
    for names in groups:
        weights = [{k: params[f"{n}_{k}"][m] for k in ("w_ih", "w_hh", "b_ih")} for m in range(members) for n in names]
        for w in weights:
            w["b_hh"] = torch.zeros_like(w["b_ih"])
        h0 = torch.stack([params[f"{n}_h0"][m].clamp(-clip, clip).expand(trials, -1)
                          for m in range(members) for n in names])
        # one member's encoders share its input; members' inputs differ (their own dropout)
        inputs = x[0] if members == 1 else x.repeat_interleave(len(names), 0)
        out, h_n = gru(inputs, h0, weights, tuple(n.endswith("bwd") for n in names) * members)
        out, h_n = out.unflatten(0, (members, len(names))), h_n.unflatten(0, (members, len(names)))
        for i, name in enumerate(names):
            outputs[name], finals[name] = out[:, i].transpose(1, 2), h_n[:, i]  # the kernel's own time-major order
    ic_features = F.dropout(torch.cat([finals["ic_enc_fwd"], finals["ic_enc_bwd"]], -1), dropout, training)
    ic_mean, ic_logvar = _linear(ic_features, params["ic_w"], params["ic_b"]).chunk(2, -1)
    ic_std = torch.sqrt(ic_logvar.exp() + params["ic_post_var_min"][:, None, None])
    ci_fwd, ci_bwd = outputs["ci_enc_fwd"], outputs["ci_enc_bwd"]
    if lag:
        ci_fwd = F.pad(ci_fwd, (0, 0, 0, 0, lag, 0))[:, :-lag]
        ci_bwd = F.pad(ci_bwd, (0, 0, 0, 0, 0, lag))[:, lag:]
    return ic_mean, ic_std, torch.cat([ci_fwd, ci_bwd], -1)


def _cell(gates_x, h, w_hh, clip):
    """One GRU step of each member from the input's gate pre-activations ``gates_x: (K, trials,
    3 hidden)`` (bias included), ``h: (K, trials, hidden)``, ``w_hh: (K, 3 hidden, hidden)``."""
    gates_h = h @ w_hh.mT
    hidden = h.shape[-1]
    reset_update = torch.sigmoid(gates_x[..., :2 * hidden] + gates_h[..., :2 * hidden])
    reset, update = reset_update[..., :hidden], reset_update[..., hidden:]
    new = torch.tanh(gates_x[..., 2 * hidden:] + reset * gates_h[..., 2 * hidden:])
    return torch.lerp(new, h.to(new.dtype), update).clamp(-clip, clip)  # under autocast h may be float32


def _keep_masks(shape, p: float, training: bool, like: torch.Tensor):
    """Inverted-dropout masks (0, or ``1 / (1 - p)``) of ``shape``, or None outside training."""
    if not training or not p:
        return None
    # the comparison in place keeps the draws' dtype: converting a bool tensor is slow on a CPU
    return torch.rand(shape, device=like.device).ge_(p).to(like.dtype).div_(1 - p)


def _decode(params, ic, ci, fwd_steps: int, dropout: float, training: bool, sample: bool):
    """Unroll controller and generator over ``bins + fwd_steps``, every member at once, from the
    initial conditions ``ic: (K, trials, ic_dim)`` and the controller's input ``ci: (K, bins,
    trials, width)``. Returns the factors ``(K, trials, steps, fac_dim)`` and the inferred inputs'
    posterior means, standard deviations and the inputs used (samples or means), each ``(K,
    trials, steps, co_dim)``."""
    members, bins, trials, ci_width = ci.shape
    clip = _setting(params, "cell_clip")
    fac_w = F.normalize(params["fac_w"], dim=-1)  # lfads-torch's kernel-normalised factor map
    ci = F.pad(ci, (0, 0, 0, 0, 0, fwd_steps))
    keep_ci = _keep_masks(ci.shape, dropout, training, ci)
    ci = ci * keep_ci if keep_ci is not None else ci
    # the controller's input projection of every step at once; the factors' part waits for them
    con_x = _linear(ci, params["con_w_ih"][..., :ci_width], params["con_b_ih"])
    gen = _linear(ic, params["g0_w"], params["g0_b"])
    steps = bins + fwd_steps
    # every step's dropout masks and noise drawn at once: a draw per step is most of a step's time on a CPU
    keep_gen = _keep_masks((members, steps + 1, trials, gen.shape[-1]), dropout, training, gen)
    keep_factor = _keep_masks((members, steps, trials, fac_w.shape[-2]), dropout, training, gen)
    factor = _linear(gen * keep_gen[:, -1] if keep_gen is not None else gen, fac_w)
    gen = gen.clamp(-clip, clip)
    con = params["con_h0"].clamp(-clip, clip)[:, None].expand(-1, trials, -1)
    noise = torch.randn(members, steps, trials, params["co_b"].shape[-1] // 2, device=ci.device,
                        dtype=con_x.dtype) if sample else None
    outputs = decode(con_x, con, gen, factor, params["con_w_ih"][..., ci_width:], params["con_w_hh"],
                     params["co_w"], params["co_b"], params["gen_w_ih"], params["gen_b_ih"], params["gen_w_hh"],
                     fac_w, keep_factor, None if keep_gen is None else keep_gen[:, :-1], noise, clip)
    return tuple(x.transpose(1, 2) for x in outputs)


def _unroll(con_x, con0, gen0, factor0, con_w_factors, con_w_hh, co_w, co_b, gen_w_ih, gen_b_ih, gen_w_hh, fac_w,
            keep_factor, keep_gen, noise, clip: float):
    """``nlbfab.models.lfads_decoder.decode`` (same arguments and outputs) step by step,
    recorded by autograd: the reference the tests and ``benchmarks/gpu_check.py`` hold the
    decoder to."""
    con, gen, factor = con0, gen0, factor0
    factors, means, stds, inputs = [], [], [], []
    for t in range(con_x.shape[1]):
        factor_in = factor * keep_factor[:, t] if keep_factor is not None else factor
        con = _cell(con_x[:, t] + factor_in @ con_w_factors.mT, con, con_w_hh, clip)
        mean, logvar = (con @ co_w.mT + co_b[:, None]).chunk(2, -1)
        std = torch.exp(0.5 * logvar)
        u = mean + std * noise[:, t] if noise is not None else mean
        gen = _cell(u @ gen_w_ih.mT + gen_b_ih[:, None], gen, gen_w_hh, clip)
        factor = (gen * keep_gen[:, t] if keep_gen is not None else gen) @ fac_w.mT
        factors.append(factor)
        means.append(mean)
        stds.append(std)
        inputs.append(u)
    return tuple(torch.stack(x, 1) for x in (factors, means, stds, inputs))


def _forward(params, heldin, fwd_steps, dropout, training, sample, session=0):
    """Stacked ``params`` (``_stacked``) on ``heldin: (K, trials, bins, heldin)``: each member's
    log-rates and factors, ``(K, trials, bins + fwd_steps, ...)``, and its posteriors."""
    ic_mean, ic_std, ci = _encode(params, _read_in(params, heldin, session, dropout, training), dropout, training)
    ic = ic_mean + ic_std * torch.randn_like(ic_std) if sample else ic_mean
    factors, co_mean, co_std, co = _decode(params, ic, ci, fwd_steps, dropout, training, sample)
    readout = f"readout{session}" if session else "readout"
    logrates = _linear(factors, params[f"{readout}_w"], params[f"{readout}_b"])
    return logrates, factors, (ic_mean, ic_std), (co_mean, co_std, co)


def apply_members(members, heldin, fwd_steps: int, *, dropout: float = 0.0, training: bool = False,
                  session: int = 0):
    """``apply`` of K members at once (``members``: K parameter dicts of one run's settings), each
    with its own dropout masks and posterior samples, on the same ``heldin: (trials, bins,
    heldin)``: ``(logrates (K, trials, bins + fwd, neurons), factors (K, trials, bins + fwd,
    fac_dim))``. Every member's encoders, controller and generator step together: one batched
    matmul where the members in turn would make K."""
    logrates, factors, _, _ = _forward(_stacked(members), heldin.expand(len(members), *heldin.shape), fwd_steps,
                                       dropout, training, sample=training, session=session)
    return logrates, factors


def apply(params, heldin, fwd_steps: int, *, dropout: float = 0.0, training: bool = False, session: int = 0):
    """``heldin: (trials, bins, heldin)`` -> ``(logrates, factors)`` over ``bins + fwd_steps``
    bins. Posterior means (deterministic) unless ``training``, which samples both posteriors.
    ``session``: which split's read-in and read-out (0, the run's split; k, its k-th companion)."""
    logrates, factors = apply_members([params], heldin, fwd_steps, dropout=dropout, training=training,
                                      session=session)
    return logrates[0], factors[0]


def submission_apply_members(members, heldin, fwd_steps: int):
    """The submission's ``apply_members``: each member's rates the mean over ``submit_passes``
    passes whose held-in inputs coordinated dropout hides as in training (``cd_rate``), the
    factors those of the pass on every input. Trained on inputs so hidden, the model reads each
    mask as another view of the trial, and the mean of its views is a cheap ensemble
    (benchmarks/README.md, "Passes under coordinated dropout"). Each call's masks draw from a CPU
    generator seeded 0: the same rates for the same trials on every call and rank."""
    logrates, factors = apply_members(members, heldin, fwd_steps)
    passes, rate = int(members[0]["submit_passes"]), float(members[0]["cd_rate"])
    if passes == 1 or rate == 0:
        return logrates, factors
    generator = torch.Generator().manual_seed(0)
    total = torch.zeros(logrates.shape, device=logrates.device)
    for _ in range(passes):
        total += apply_members(members, coordinated_dropout(heldin, rate, generator)[0], fwd_steps)[0].float().exp()
    return (total / passes).log(), factors


def inferred_inputs(params, heldin, fwd_steps: int) -> torch.Tensor:
    """The inferred inputs' posterior means, ``(trials, bins + fwd_steps, co_dim)``: what the
    controller says pushed each trial off the path its initial condition sets, step by step the
    generator's only input in ``apply``."""
    _, _, _, (co_mean, _, _) = _forward(_stacked([params]), heldin[None], fwd_steps, 0.0, training=False,
                                        sample=False)
    return co_mean[0]


def kl_normal(mean, std, prior_mean, prior_logvar) -> torch.Tensor:
    """KL(N(mean, std^2) || N(prior_mean, exp(prior_logvar))), summed over the last axis and
    averaged over trials: the initial condition's KL term. ``mean, std: (..., trials, dims)``,
    the prior's ``(..., dims)``; leading axes (members) stay."""
    prior_mean, prior_logvar = prior_mean.unsqueeze(-2), prior_logvar.unsqueeze(-2)
    prior_var = prior_logvar.exp()
    kl = 0.5 * (prior_logvar - 2 * std.log() + (std ** 2 + (mean - prior_mean) ** 2) / prior_var - 1)
    return kl.sum(-1).mean(-1)


def ar1_log_prob(u, logtau, lognvar) -> torch.Tensor:
    """Log-density of ``u: (..., trials, steps, dims)`` under independent AR(1) processes per dim
    with time constant ``exp(logtau)`` bins and noise variance ``exp(lognvar)`` (``(...,
    dims)``), started from their stationary distribution; summed over steps and dims, per trial."""
    alpha = torch.exp(-1 / logtau.exp()).unsqueeze(-2)  # (..., 1, dims): the same for every trial
    nvar = lognvar.exp().unsqueeze(-2)
    first = torch.distributions.Normal(0.0, torch.sqrt(nvar / (1 - alpha ** 2)), validate_args=False).log_prob(
        u[..., 0, :])
    rest = torch.distributions.Normal(alpha.unsqueeze(-2) * u[..., :-1, :], nvar.unsqueeze(-2).sqrt(),
                                      validate_args=False).log_prob(u[..., 1:, :])
    return first.sum(-1) + rest.sum((-1, -2))


def kl_ar1(u, mean, std, logtau, lognvar) -> torch.Tensor:
    """A one-sample estimate of KL(posterior || AR(1) prior) of the inferred inputs at the
    sample ``u`` drawn from ``N(mean, std^2)``, averaged over trials (lfads-torch's estimate)."""
    # unvalidated: a diverged run's NaN makes a NaN loss, which the loop's NaN stop names in one line
    log_q = torch.distributions.Normal(mean, std, validate_args=False).log_prob(u).sum((-1, -2))
    return (log_q - ar1_log_prob(u, logtau, lognvar)).mean(-1)


def ramp(epoch: int, start: float, increase: float) -> float:
    """lfads-torch's warm-up: 0 before ``start``, then up to 1 over ``increase`` epochs."""
    return min(max((epoch + 1 - start) / (increase + 1), 0.0), 1.0)


def coordinated_dropout(heldin, rate: float, generator=None):
    """Hide each held-in entry with probability ``rate`` (the rest scaled by ``1 / (1 - rate)``).
    Returns ``(masked input, hidden)``; the loss trains the model on the hidden entries only."""
    device = generator.device if generator is not None else heldin.device
    hidden = (torch.rand(heldin.shape, device=device, generator=generator) < rate).to(heldin.device)
    return heldin.masked_fill(hidden, 0) / (1 - rate), hidden


def coordinated_dropout_loss(logrates, target, hidden) -> torch.Tensor:
    """The Poisson loss of ``logrates`` over every entry of ``target``, whose gradient comes only
    from the held-in entries that ``hidden: (trials, bins, heldin)`` hid from the input, and
    from all held-out neurons and forward bins: lfads-torch's coordinated dropout."""
    trains = torch.ones_like(logrates, dtype=torch.bool)
    trains[:, :hidden.shape[1], :hidden.shape[2]] = hidden
    return poisson_nll(torch.where(trains, logrates, logrates.detach()), target)


def l2_recurrent(params) -> torch.Tensor:
    """lfads-torch's penalty: half the squared norm of every recurrent matrix, per entry (of each
    member, where ``params`` are stacked)."""
    matrices = [params[f"{n}_w_hh"] for n in (*ENCODERS, "con", "gen")]
    return 0.5 * sum(w.pow(2).sum((-1, -2)) for w in matrices) / sum(w.shape[-1] * w.shape[-2] for w in matrices)


def training_loss_members(members, heldin, target, *, dropout: float, epoch: int, session: int = 0):
    """``training_loss`` of K members at once (``members``: K parameter dicts of one run's
    settings), each with its own coordinated dropout, dropout masks and posterior samples, on the
    same batch: ``(losses (K,), terms {name: (K,)})``."""
    params, bins = _stacked(members), heldin.shape[1]
    masked, hidden = coordinated_dropout(heldin.expand(len(members), *heldin.shape), _setting(params, "cd_rate"))
    logrates, _, (ic_mean, ic_std), (co_mean, co_std, co) = _forward(
        params, masked, target.shape[1] - bins, dropout, training=True, sample=True, session=session)
    recon = torch.stack([coordinated_dropout_loss(rates, target, hid) for rates, hid in zip(logrates, hidden)])
    kl_ic = kl_normal(ic_mean.float(), ic_std.float(), params["ic_prior_mean"], params["ic_prior_logvar"])
    kl_co = kl_ar1(co.float(), co_mean.float(), co_std.float(), params["co_prior_logtau"], params["co_prior_lognvar"])
    l2 = l2_recurrent(params)
    kl_weight = ramp(epoch, _setting(params, "kl_start_epoch"), _setting(params, "kl_increase_epoch"))
    l2_weight = ramp(epoch, _setting(params, "l2_start_epoch"), _setting(params, "l2_increase_epoch"))
    # the weights as tensors: reading them as numbers would wait for a GPU
    loss = recon + kl_weight * (params["kl_ic_scale"] * kl_ic + params["kl_co_scale"] * kl_co) \
        + l2_weight * params["l2_scale"] * l2
    return loss, {"recon": recon.detach(), "kl_ic": kl_ic.detach(), "kl_co": kl_co.detach(), "l2": l2.detach()}


def training_loss(params, heldin, target, *, dropout: float, epoch: int, session: int = 0):
    """The training objective of one batch: the Poisson loss of the rates under coordinated
    dropout (its value over every entry, its gradient from the hidden held-in entries, all
    held-out neurons and all forward bins), plus the warmed-up KL terms and L2 penalty.
    ``target: (trials, bins + fwd, heldin + heldout)``; ``session`` as in ``apply``. Returns
    ``(loss, terms)``."""
    losses, terms = training_loss_members([params], heldin, target, dropout=dropout, epoch=epoch, session=session)
    return losses[0], {name: value[0] for name, value in terms.items()}
