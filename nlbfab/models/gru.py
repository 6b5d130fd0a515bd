"""A GRU layer for the CPU with a hand-written backward pass; PyTorch's fused kernel elsewhere.

The SAE's GRUs are small (batch 64, hidden 64) and long (up to 180 bins), so on a CPU an epoch
is spent dispatching tiny per-step ops, not in arithmetic: ``aten::gru`` records about ten
autograd nodes per step and replays twice as many in backward. Here the recurrence is one
``torch.autograd.Function``: six ops per step forward, four per step backward (every gate
derivative that does not depend on the incoming gradient is computed for all steps at once),
the weight gradients are one matmul over all steps, and independent GRUs (the encoder's two
directions) step together as one batched matmul. The maths is PyTorch's GRU exactly
(``tests/test_models.py`` checks values and gradients against ``torch.nn.GRU``); on CUDA
``aten::gru`` (cuDNN) is already one fused kernel, so it is used there.
"""
from __future__ import annotations

import torch

# backward computes the gate derivatives of this many steps at once: few ops, still in cache
BACKWARD_CHUNK = 8
# devices whose ``aten::gru`` is one fused kernel (cuDNN); every other device gets ``GRULayers``
FUSED_DEVICES = ("cuda",)
# looked up at each call, so that a test can record the arguments that reach the kernel
aten_gru = torch.ops.aten.gru.input


def gru(inputs: torch.Tensor, h0: torch.Tensor, weights: list[dict[str, torch.Tensor]],
        reverse: tuple[bool, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``D = len(weights)`` independent one-layer GRUs over the same inputs, or each over
    its own (an ensemble's members see the same batch through their own dropout masks).

    ``inputs: (batch, time, features)``, or ``(D, batch, time, features)`` for inputs of their
    own; ``h0: (D, batch, hidden)``; each ``weights[d]`` holds
    PyTorch's ``w_ih (3h, features)``, ``w_hh (3h, h)``, ``b_ih``, ``b_hh (3h,)`` in its
    (reset, update, new) gate order; GRU ``d`` reads time backwards where ``reverse[d]``.
    Returns ``(outputs (D, batch, time, hidden), h_n (D, batch, hidden))``, outputs in the
    inputs' time order."""
    if inputs.device.type in FUSED_DEVICES:
        return _fused_gru(inputs, h0, weights, reverse, fused_train_mode(inputs.device, torch.is_grad_enabled()))
    device = inputs.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else inputs.dtype
    stacked = [torch.stack([w[name] for w in weights]).to(dtype) for name in ("w_ih", "w_hh", "b_ih", "b_hh")]
    with torch.autocast(device, enabled=False):
        time_major = inputs.to(dtype).transpose(-3, -2).contiguous()
        states = _gru_layers(time_major, h0.to(dtype), *stacked, tuple(reverse))  # (D, 1 + time, batch, h)
    outputs = [states[d, 1:].flip(0) if rev else states[d, 1:] for d, rev in enumerate(reverse)]
    return torch.stack(outputs).transpose(1, 2), states[:, -1]


@torch.compiler.disable  # torch.compile would unroll the loop over time: minutes of compiling, no gain
def _gru_layers(*args):
    return GRULayers.apply(*args)


def fused_train_mode(device: torch.device, grad_enabled: bool) -> bool:
    """``aten::gru``'s ``train`` flag on ``device``. cuDNN keeps the forward's reserve space, which
    its backward needs, only in training mode (otherwise the backward stops with "cudnn RNN
    backward can only be called in training mode"), so the flag is on whenever autograd records;
    without gradients it selects the leaner inference kernel. Dropout is 0, so it changes
    nothing else. Off the fused devices no ``aten::gru`` runs and the flag is off."""
    return grad_enabled and device.type in FUSED_DEVICES


def _fused_gru(inputs, h0, weights, reverse, train: bool):
    outputs, finals = [], []
    own = inputs.unbind(0) if inputs.dim() == 4 else [inputs] * len(weights)
    for d, (w, rev, x) in enumerate(zip(weights, reverse, own)):
        x = x.flip(1) if rev else x
        # (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        out, h_n = aten_gru(x, h0[d:d + 1].contiguous(), packed_weights(w), True, 1, 0.0, train, False, True)
        outputs.append(out.flip(1) if rev else out)
        finals.append(h_n[0])
    return torch.stack(outputs), torch.stack(finals)


def packed_weights(w: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """``w_ih, w_hh, b_ih, b_hh`` as views into one new buffer, in that order: cuDNN's layout of
    a one-layer GRU's weights. Handed over as separate tensors, cuDNN copies them into such a
    buffer at every call and warns each time ("RNN module weights are not part of single
    contiguous chunk of memory"); the copy here is the same, but autograd sees it and no warning
    is printed."""
    names = ("w_ih", "w_hh", "b_ih", "b_hh")
    flat = torch.cat([w[name].reshape(-1) for name in names])
    parts = flat.split([w[name].numel() for name in names])
    return [part.view(w[name].shape) for part, name in zip(parts, names)]


class GRULayers(torch.autograd.Function):
    """D stacked one-layer GRUs over the same time-major inputs, or each over its own.

    ``inputs: (time, batch, features)`` or ``(D, time, batch, features)``, ``h0: (D, batch, h)``,
    ``w_ih: (D, 3h, features)``,
    ``w_hh: (D, 3h, h)``, ``b_ih``, ``b_hh: (D, 3h)``, ``reverse``: per GRU, whether it reads
    time backwards. Returns ``states: (D, 1 + time, batch, h)`` in each GRU's reading order,
    ``states[:, 0]`` being ``h0``. Buffers are GRU-major so that each GRU's weight gradients
    are single matmuls over all steps."""

    @staticmethod
    def forward(ctx, inputs, h0, w_ih, w_hh, b_ih, b_hh, reverse):
        steps, batch, features = inputs.shape[-3:]
        gru_count, three_h, h = w_hh.shape
        own = inputs.unbind(0) if inputs.dim() == 4 else [inputs] * gru_count
        read = [(x.flip(0) if rev else x).reshape(steps * batch, features) for x, rev in zip(own, reverse)]
        # the reset and update gates' two biases are simply summed; the new gate's recurrent
        # bias sits inside the reset product, so it stays apart
        bias = torch.cat([b_ih[:, :2 * h] + b_hh[:, :2 * h], b_ih[:, 2 * h:]], 1)
        gates = inputs.new_empty(gru_count, steps, batch, three_h)
        for d in range(gru_count):
            torch.addmm(bias[d], read[d], w_ih[d].t(), out=gates[d].view(steps * batch, three_h))
        # tanh(a) as 2 sigmoid(2a) - 1: PyTorch's CPU tanh is about five times slower than its sigmoid
        gates[..., 2 * h:].mul_(2)
        w_t = w_hh.transpose(1, 2)
        w_reset_update, w_new, b_new = w_t[..., :2 * h].contiguous(), w_t[..., 2 * h:].contiguous(), b_hh[:, None, 2 * h:]
        states = inputs.new_empty(gru_count, steps + 1, batch, h)
        states[:, 0] = h0
        reset_update = inputs.new_empty(gru_count, steps, batch, 2 * h)
        hidden_new = inputs.new_empty(gru_count, steps, batch, h)  # h_{t-1} @ w_hn.T + b_hn, kept for backward
        new = inputs.new_empty(gru_count, steps, batch, h)
        step_views = zip(gates[..., :2 * h].unbind(1), gates[..., 2 * h:].unbind(1), reset_update.unbind(1),
                         reset_update[..., :h].unbind(1), reset_update[..., h:].unbind(1), hidden_new.unbind(1),
                         new.unbind(1), states[:, :-1].unbind(1), states[:, 1:].unbind(1))
        for gate_ru, twice_gate_n, ru, reset, update, hn, n, previous, state in step_views:
            torch.baddbmm(gate_ru, previous, w_reset_update, out=ru).sigmoid_()
            torch.baddbmm(b_new, previous, w_new, out=hn)
            torch.addcmul(twice_gate_n, reset, hn, value=2, out=n).sigmoid_().mul_(2).sub_(1)
            torch.lerp(n, previous, update, out=state)  # (1 - z) n + z h
        ctx.reverse, ctx.own_inputs = reverse, inputs.dim() == 4
        ctx.save_for_backward(*read, w_ih, w_hh, reset_update, hidden_new, new, states)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        *read, w_ih, w_hh, reset_update, hidden_new, new, states = ctx.saved_tensors
        gru_count, steps, batch, h = new.shape
        reset, update = reset_update[..., :h], reset_update[..., h:]
        grad_hidden_gates = new.new_empty(gru_count, steps, batch, 3, h)  # d loss / d(h_{t-1} @ w_hh.T + b_hh)
        grad_h = torch.empty_like(new)
        grad_new_gate = torch.empty_like(new)  # d loss / d(new gate's pre-activation, input part)
        carry = torch.zeros_like(states[:, 0])
        for chunk in reversed(range(0, steps, BACKWARD_CHUNK)):
            at = slice(chunk, min(chunk + BACKWARD_CHUNK, steps))
            r, z, n, hn, previous = reset[:, at], update[:, at], new[:, at], hidden_new[:, at], states[:, at]
            # d(gate pre-activation)/d(h_t) of the chunk's steps, all at once
            not_update = 1 - z
            d_new = not_update * (1 - n * n)
            d_hidden_new = d_new * r
            per_state = torch.stack([d_hidden_new * hn * (1 - r), (previous - n) * z * not_update, d_hidden_new], -2)
            for t in reversed(range(at.start, at.stop)):
                k = t - at.start
                torch.add(grad_states[:, t + 1], carry, out=grad_h[:, t])
                gates = torch.mul(per_state[:, k], grad_h[:, t, :, None], out=grad_hidden_gates[:, t]).flatten(-2)
                carry = torch.baddbmm(grad_h[:, t] * z[:, k], gates, w_hh)
            torch.mul(grad_h[:, at], d_new, out=grad_new_gate[:, at])
        previous = states[:, :-1]
        grad_hidden_gates = grad_hidden_gates.view(gru_count, steps * batch, 3 * h)
        grad_new_gate = grad_new_gate.view(gru_count, steps * batch, h)
        # the input gates' gradient is (reset and update columns of the recurrent one, new gate's)
        input_parts = [(grad_hidden_gates[d, :, :2 * h], grad_new_gate[d]) for d in range(gru_count)]
        grad_w_ih = torch.stack([torch.cat([ru.t() @ x, n.t() @ x]) for (ru, n), x in zip(input_parts, read)])
        grad_w_hh = torch.stack([grad_hidden_gates[d].t() @ previous[d].reshape(steps * batch, h)
                                 for d in range(gru_count)])
        grad_b_hh = grad_hidden_gates.sum(1)
        grad_b_ih = torch.cat([grad_b_hh[:, :2 * h], grad_new_gate.sum(1)], 1)
        grad_inputs = None
        if ctx.needs_input_grad[0]:
            per_gru = [torch.addmm(n @ w[2 * h:], ru, w[:2 * h]).view(steps, batch, -1)
                       for (ru, n), w in zip(input_parts, w_ih)]
            in_order = [g.flip(0) if rev else g for g, rev in zip(per_gru, ctx.reverse)]
            grad_inputs = torch.stack(in_order) if ctx.own_inputs else sum(in_order)
        return grad_inputs, carry + grad_states[:, 0], grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, None
