"""LFADS's controller and generator unrolled as one autograd Function.

Step by step the controller reads its input and the last factors, emits the inferred input's
posterior (mean, standard deviation) and the input ``u``, the generator steps on ``u`` and gives
the next factors. Recorded by autograd, each step is some thirty tiny ops forward and twice as
many nodes backward, and on a CPU their dispatch, not their arithmetic, sets the time. Here the
forward records nothing; everything that does not depend on the carried state (the
controller's input projection, the dropout masks, the sampling noise) comes in computed for all
steps at once; each cell's gates are two in-place matmuls per step, the input's and the state's,
into one buffer laid out so that each fills its share in one call; the backward carries the
gradients of both states and of the last factors, forms each cell's four gate gradients in one
product with derivatives computed for several steps at once, and gives every weight gradient as
one matmul over all steps at the end. On a GPU, where each op is a kernel launch, the fewer ops
make it faster than autograd's loop as well (``benchmarks/gpu_check.py`` checks it against that
loop there and times both). An ensemble's members step together: each matmul is one batched
matmul over them (``bmm``), each elementwise op one op for all, so a step of K members costs the
ops of one model.

The maths is ``nlbfab.models.lfads``'s step-by-step decoder exactly (``tests/test_lfads.py``
checks values and gradients against it): PyTorch's GRU (the reset gate after the recurrent
matmul) without recurrent biases, states clamped to ``±clip`` (no gradient where clamped),
inverted-dropout masks on the factors fed back and on the generator state before the factor
map, ``u = mean + std * noise`` with ``std = exp(logvar / 2)`` when sampling, ``u = mean`` otherwise.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# backward computes the gate derivatives of this many steps at once: few ops, still in cache
BACKWARD_CHUNK = 16


def decode(con_x, con0, gen0, factor0, con_w_factors, con_w_hh, co_w, co_b, gen_w_ih, gen_b_ih, gen_w_hh, fac_w,
           keep_factor, keep_gen, noise, clip: float):
    """Unroll controller and generator over ``steps`` bins.

    Every tensor has a member axis of size K in front (an ensemble's members, each with its own
    weights, step together; one model is K = 1), time before trials: ``con_x: (K, steps, trials,
    3 con)``: the controller's input projection, bias included; ``con0: (K, trials, con)``,
    ``gen0: (K, trials, gen)``: the initial states; ``factor0: (K, trials, fac)``: the factors
    fed to the first step; weights as in ``nlbfab.models.lfads`` with K in front
    (``con_w_factors: (K, 3 con, fac)``: the factor columns of ``con_w_ih``; ``fac_w`` already
    normalised); ``keep_factor: (K, steps, trials, fac)``, ``keep_gen: (K, steps, trials, gen)``:
    dropout masks or None; ``noise: (K, steps, trials, co)`` or None (no sampling). Returns
    ``(factors (K, steps, trials, fac), means, stds, inputs (K, steps, trials, co))``. Under
    autocast it computes in the autocast dtype; gradients reach float32 weights as float32."""
    device = con_x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else con_x.dtype
    tensors = [None if x is None else x.to(dtype) for x in (
        con_x, con0, gen0, factor0, con_w_factors, con_w_hh, co_w, co_b, gen_w_ih, gen_b_ih, gen_w_hh, fac_w,
        keep_factor, keep_gen, noise)]
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
            return _decode(*tensors, float(clip))
        outputs, _ = _forward(*tensors, float(clip))
        return outputs


@torch.compiler.disable  # torch.compile would unroll the loop over time: minutes of compiling, no gain
def _decode(*args):
    return ControllerGenerator.apply(*args)


def _new_gate_first(w):
    """``(K, 3 hidden, k)`` weights in PyTorch's (reset, update, new) row order as ``(K, k, 3
    hidden)`` columns (new, reset, update): see ``_cell_views``."""
    hidden = w.shape[-2] // 3
    return torch.cat([w[:, 2 * hidden:], w[:, :2 * hidden]], 1).mT


def _torch_gate_order(grad):
    """Gradients with (new, reset, update) in the last axis, in PyTorch's order (reset, update, new)."""
    hidden = grad.shape[-1] // 3
    return torch.cat([grad[..., hidden:], grad[..., :hidden]], -1)


def _acting(clip: float) -> float | None:
    """The clip, or None where it never acts: a state is a convex combination of the last state
    and a tanh in (-1, 1), and lerp rounds within its ends, so from initial states within the
    clip (``nlbfab.models.lfads`` clamps them) a clip of 1 or more is the identity."""
    return clip if clip < 1 else None


def _views(*buffers):
    """Each buffer's per-step views ``(K, trials, n)`` (None stays None), made once rather than at
    every step. Member-major buffers make a step's view strided across members, which the
    batched matmuls take as they are, and each member's steps one block for its weight gradients."""
    return [None if b is None else b.unbind(1) for b in buffers]


def _cell_views(gates, new, pre, states):
    """Per-step views of one GRU's buffers for ``_cell``. ``gates: (K, steps, trials, 4 hidden)``
    in columns (new gate's input part, reset, update, new gate's recurrent part): the input's
    matmul fills the first three, the state's the last three, each in one call; ``states: (K, steps
    + 1, trials, hidden)``, the initial state first. ``pre``, the states before the clamp, is
    None where the clamp is the identity."""
    hidden = new.shape[-1]
    return _views(gates[..., hidden:3 * hidden], gates[..., hidden:2 * hidden], gates[..., 2 * hidden:3 * hidden],
                  gates[..., :hidden], gates[..., 3 * hidden:], new, pre, states)


def _cell(views, t: int, clip: float | None):
    """Step ``t`` of one GRU in place, once its gates hold the input's and the state's matmuls
    (bias included): reset and update gates end after their sigmoid, ``new`` holds the new gate,
    ``pre`` the state before the clamp (None: no clamp), ``states[t + 1]`` the state."""
    reset_update, reset, update, input_new, hidden_new, new, pre, states = views
    reset_update[t].sigmoid_()
    torch.addcmul(input_new[t], reset[t], hidden_new[t], out=new[t]).tanh_()
    torch.lerp(new[t], states[t], update[t], out=states[t + 1] if pre is None else pre[t])  # (1 - z) n + z h
    if pre is not None:
        torch.clamp(pre[t], -clip, clip, out=states[t + 1])


def _forward(con_x, con0, gen0, factor0, con_w_factors, con_w_hh, co_w, co_b, gen_w_ih, gen_b_ih, gen_w_hh, fac_w,
             keep_factor, keep_gen, noise, clip: float):
    """The unrolled recurrence without autograd: ``(outputs, buffers for the backward)``."""
    members, steps, trials, _ = con_x.shape
    con, gen, fac, co = con_w_hh.shape[-1], gen_w_hh.shape[-1], fac_w.shape[-2], co_w.shape[-2] // 2
    clip = _acting(clip)
    # contiguous: a transposed operand slows these small matmuls down
    w_con_x, w_con_h, w_gen_h = (w.contiguous() for w in (_new_gate_first(con_w_factors), con_w_hh.mT, gen_w_hh.mT))
    # the generator's input, [1, u], times [bias, w_ih] fills all four columns, the recurrent
    # part with zeros: no bias to broadcast at every step
    w_gen_x = torch.cat([_new_gate_first(torch.cat([gen_b_ih[..., None], gen_w_ih], -1)),
                         gen_w_ih.new_zeros(members, 1 + co, gen)], -1)
    # the log-variance rows halved: the matmul gives logvar / 2, and std is one exp away
    half = torch.cat([co_w.new_ones(co), co_w.new_full((co,), 0.5)])
    w_co, b_co = (co_w * half[:, None]).mT.contiguous(), (co_b * half)[:, None]
    fac_w_t = fac_w.mT.contiguous()
    new = lambda *shape: con_x.new_empty(members, shape[0], trials, *shape[1:])  # noqa: E731
    fed = new(steps + 1, fac)  # row t: the factors fed to step t (the last: unused)
    fed[:, 0] = factor0 * keep_factor[:, 0] if keep_factor is not None else factor0
    con_states, gen_states = new(steps + 1, con), new(steps + 1, gen)
    ones_u = new(steps, 1 + co)
    ones_u[..., 0], u = 1, ones_u[..., 1:]
    con_states[:, 0], gen_states[:, 0] = con0, gen0
    con_gates, gen_gates = new(steps, 4 * con), new(steps, 4 * gen)
    # the controller's input projection of every step at once, in _cell_views' column order
    con_gates[..., :con], con_gates[..., con:3 * con] = con_x[..., 2 * con:], con_x[..., :2 * con]
    con_gates[..., 3 * con:] = 0
    con_new, gen_new = new(steps, con), new(steps, gen)
    con_pre, gen_pre = (None, None) if clip is None else (new(steps, con), new(steps, gen))
    posterior = new(steps, 2 * co)  # [mean, std]
    factors = new(steps, fac) if keep_factor is not None else fed[:, 1:]
    gen_kept = new(steps, gen) if keep_gen is not None else gen_states[:, 1:]
    con_views, gen_views = _cell_views(con_gates, con_new, con_pre, con_states), \
        _cell_views(gen_gates, gen_new, gen_pre, gen_states)
    con_state, gen_state = con_views[-1], gen_views[-1]
    (gates_con_x, gates_con_h, gates_gen, gates_gen_h, fed_, mean_std, mean, std, u_, ones_u_, noise_, keep_g, kept,
     factor, keep_f) = _views(
        con_gates[..., :3 * con], con_gates[..., con:], gen_gates, gen_gates[..., gen:], fed, posterior,
        posterior[..., :co], posterior[..., co:], u, ones_u, noise, keep_gen, gen_kept, factors, keep_factor)
    for t in range(steps):
        gates_con_x[t].baddbmm_(fed_[t], w_con_x)
        gates_con_h[t].baddbmm_(con_state[t], w_con_h)
        _cell(con_views, t, clip)
        torch.baddbmm(b_co, con_state[t + 1], w_co, out=mean_std[t])
        std[t].exp_()
        if noise is None:
            u_[t].copy_(mean[t])
        else:
            torch.addcmul(mean[t], std[t], noise_[t], out=u_[t])
        torch.bmm(ones_u_[t], w_gen_x, out=gates_gen[t])
        gates_gen_h[t].baddbmm_(gen_state[t], w_gen_h)
        _cell(gen_views, t, clip)
        if keep_gen is not None:
            torch.mul(gen_state[t + 1], keep_g[t], out=kept[t])
        torch.bmm(kept[t], fac_w_t, out=factor[t])
        if keep_factor is not None and t + 1 < steps:
            torch.mul(factor[t], keep_f[t + 1], out=fed_[t + 1])
    outputs = (factors, posterior[..., :co], posterior[..., co:], u)
    buffers = (fed, con_states, con_gates, con_new, con_pre, ones_u, gen_states, gen_gates, gen_new, gen_pre, posterior,
               gen_kept, w_con_x, w_con_h, w_gen_x, w_gen_h, w_co, fac_w)
    return outputs, buffers


def _gate_derivatives(gates, new, pre, previous, clip: float | None, per_state, update_kept):
    """For the steps of one chunk, into ``per_state: (K, steps, trials, 4, hidden)``: d(gate
    pre-activations) / d(state) in ``_cell_views``' column order; into ``update_kept: (K, steps,
    trials, hidden)``: d(state) / d(previous state) past the gates; both zero where the state was
    clamped (the clamp passes the gradient at the bounds themselves, as autograd's)."""
    hidden = new.shape[-1]
    reset, update = gates[..., hidden:2 * hidden], gates[..., 2 * hidden:3 * hidden]
    hidden_new = gates[..., 3 * hidden:]
    if clip is None:
        update_kept.copy_(update)
        not_update = 1 - update
    else:
        kept = pre.abs().le_(clip)  # 1 or 0 in the state's dtype: a product with a bool tensor is slow
        torch.mul(update, kept, out=update_kept)
        not_update = kept.sub_(update_kept)  # (1 - z) where kept
    d_new = torch.addcmul(not_update, not_update * new, new, value=-1, out=per_state[..., 0, :])  # (1 - z)(1 - n^2)
    d_hidden_new = torch.mul(d_new, reset, out=per_state[..., 3, :])
    d_reset = d_hidden_new * hidden_new
    torch.addcmul(d_reset, d_reset, reset, value=-1, out=per_state[..., 1, :])  # times r (1 - r)
    torch.mul(previous - new, update_kept, out=per_state[..., 2, :]).mul_(not_update)  # times z (1 - z)


class ControllerGenerator(torch.autograd.Function):
    """``decode``'s recurrence (see there for the arguments); forward and backward by hand.
    Buffers are ``(K, steps, trials, n)``: a step's slice is one block per member, and each
    member's weight gradient one matmul over all its steps (a batched matmul over the members)."""

    @staticmethod
    def forward(ctx, con_x, con0, gen0, factor0, con_w_factors, con_w_hh, co_w, co_b, gen_w_ih, gen_b_ih, gen_w_hh,
                fac_w, keep_factor, keep_gen, noise, clip):
        outputs, buffers = _forward(con_x, con0, gen0, factor0, con_w_factors, con_w_hh, co_w, co_b, gen_w_ih,
                                    gen_b_ih, gen_w_hh, fac_w, keep_factor, keep_gen, noise, clip)
        ctx.clip = _acting(clip)
        ctx.save_for_backward(*buffers, keep_factor, keep_gen, noise)
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_factors, grad_means, grad_stds, grad_inputs):
        (fed, con_states, con_gates, con_new, con_pre, ones_u, gen_states, gen_gates, gen_new, gen_pre, posterior,
         gen_kept, w_con_x, w_con_h, w_gen_x, w_gen_h, w_co, fac_w, keep_factor, keep_gen, noise) = ctx.saved_tensors
        members, steps, trials, con = con_new.shape
        gen, fac, co = gen_new.shape[-1], fac_w.shape[-2], ones_u.shape[-1] - 1
        new = lambda *shape: fed.new_empty(members, shape[0], trials, *shape[1:])  # noqa: E731
        zeros = lambda *shape: fed.new_zeros(members, shape[0], trials, *shape[1:])  # noqa: E731
        # each member's steps and trials as the rows of one matrix
        per_member = lambda x: x.reshape(members, -1, x.shape[-1])  # noqa: E731
        grad_factors = zeros(steps, fac) if grad_factors is None else grad_factors
        std = posterior[..., co:]
        # d loss / d(mean, logvar / 2) but the generator's part, all steps at once: u = mean +
        # std * noise, so the inputs' gradient joins the mean's and, times noise, the std's
        grad_posterior = zeros(steps, 2 * co)
        for g in (grad_means, grad_inputs):
            if g is not None:
                grad_posterior[..., :co] += g
        if grad_stds is not None:
            grad_posterior[..., co:] += grad_stds * std
        noise_std = None if noise is None else noise * std
        if noise_std is not None and grad_inputs is not None:
            grad_posterior[..., co:] += grad_inputs * noise_std
        # d loss / d(kept generator state): the factors' part now, the fed factors' in the loop
        grad_kept = torch.bmm(per_member(grad_factors), fac_w).view(members, steps, trials, gen)
        # gate derivatives, computed chunk by chunk, become the gates' gradients in place
        grad_con_gates, grad_gen_gates = new(steps, 4, con), new(steps, 4, gen)
        con_update, gen_update = new(steps, con), new(steps, gen)
        # d loss / d(state) carried back, d loss / d(factors fed), row t: before step t; a last
        # row of zeros starts the loop
        grad_con, grad_gen, grad_fed = (new(steps + 1, n) for n in (con, gen, fac))
        grad_con[:, -1], grad_gen[:, -1], grad_fed[:, -1] = 0, 0, 0
        grad_u = new(steps, co)  # through the generator's gates
        w_con_x_t, w_con_h_t, w_gen_x_t, w_gen_h_t, w_co_t = (w.mT.contiguous() for w in (
            w_con_x, w_con_h, w_gen_x[:, 1:, :3 * gen], w_gen_h, w_co))
        flat_con, flat_gen = (g.flatten(-2) for g in (grad_con_gates, grad_gen_gates))
        (gates_con, gates_gen, con_in_gates, con_state_gates, gen_in_gates, gen_state_gates, update_con, update_gen,
         kept, keep_g, keep_f, noise_std_, grad_u_, fed_, carry_con, carry_gen, carry_con_rows, carry_gen_rows,
         mean_std, mean, std_) = _views(
            grad_con_gates, grad_gen_gates, flat_con[..., :3 * con], flat_con[..., con:], flat_gen[..., :3 * gen],
            flat_gen[..., gen:], con_update, gen_update, grad_kept, keep_gen, keep_factor, noise_std, grad_u, grad_fed,
            grad_con, grad_gen, grad_con.unsqueeze(-2), grad_gen.unsqueeze(-2), grad_posterior,
            grad_posterior[..., :co], grad_posterior[..., co:])
        for chunk in reversed(range(0, steps, BACKWARD_CHUNK)):
            at = slice(chunk, min(chunk + BACKWARD_CHUNK, steps))
            _gate_derivatives(con_gates[:, at], con_new[:, at], None if con_pre is None else con_pre[:, at],
                              con_states[:, at], ctx.clip, grad_con_gates[:, at], con_update[:, at])
            _gate_derivatives(gen_gates[:, at], gen_new[:, at], None if gen_pre is None else gen_pre[:, at],
                              gen_states[:, at], ctx.clip, grad_gen_gates[:, at], gen_update[:, at])
            for t in reversed(range(at.start, at.stop)):
                kept[t].baddbmm_(fed_[t + 1], fac_w)
                state = carry_gen[t + 1].addcmul_(kept[t], keep_g[t]) if keep_gen is not None else \
                    carry_gen[t + 1].add_(kept[t])
                gates_gen[t].mul_(carry_gen_rows[t + 1])
                torch.bmm(gen_in_gates[t], w_gen_x_t, out=grad_u_[t])
                torch.bmm(gen_state_gates[t], w_gen_h_t, out=carry_gen[t]).addcmul_(state, update_gen[t])
                mean[t].add_(grad_u_[t])
                if noise is not None:
                    std_[t].addcmul_(grad_u_[t], noise_std_[t])
                state = carry_con[t + 1].baddbmm_(mean_std[t], w_co_t)
                gates_con[t].mul_(carry_con_rows[t + 1])
                torch.bmm(con_in_gates[t], w_con_x_t, out=fed_[t])
                torch.bmm(con_state_gates[t], w_con_h_t, out=carry_con[t]).addcmul_(state, update_con[t])
                if keep_factor is not None:
                    fed_[t].mul_(keep_f[t])
        # every weight gradient: one matmul per member over all steps and trials
        con_rows, gen_rows = per_member(flat_con), per_member(flat_gen)
        grad_con_w_factors = _torch_gate_order(per_member(fed[:, :-1]).mT @ con_rows[..., :3 * con]).mT
        grad_con_w_hh = (per_member(con_states[:, :-1]).mT @ con_rows[..., con:]).mT
        grad_gen_b_ih, grad_gen_w_ih = _torch_gate_order(per_member(ones_u).mT @ gen_rows[..., :3 * gen]).mT.split(
            [1, co], -1)
        grad_gen_w_hh = (per_member(gen_states[:, :-1]).mT @ gen_rows[..., gen:]).mT
        half = torch.cat([w_co.new_ones(co), w_co.new_full((co,), 0.5)])
        grad_posterior = per_member(grad_posterior)
        grad_co_w = (grad_posterior.mT @ per_member(con_states[:, 1:])) * half[:, None]
        grad_co_b = grad_posterior.sum(1) * half
        grad_fac_w = per_member(grad_factors + grad_fed[:, 1:]).mT @ per_member(gen_kept)
        grad_con_x = _torch_gate_order(flat_con[..., :3 * con])
        return (grad_con_x, grad_con[:, 0], grad_gen[:, 0], grad_fed[:, 0], grad_con_w_factors, grad_con_w_hh,
                grad_co_w, grad_co_b, grad_gen_w_ih, grad_gen_b_ih[..., 0], grad_gen_w_hh, grad_fac_w,
                None, None, None, None)
