"""Mean of a per-token loss over the unmasked positions, optionally computed chunk by chunk.

With ``chunk_size`` the unmasked positions are processed ``chunk_size`` rows at a time, gathered by index chunk
by chunk (the full ``[tokens x V]`` input is never copied), and each chunk's gradient is computed in the forward
pass straight into one preallocated buffer per input that needs it (``_ChunkedSum``); the backward pass only
scales that buffer. Peak memory is the gradient itself plus one chunk's float32 intermediates. First-order
gradients only (no double backward). Used by ``telekd.losses``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["masked_mean"]


class _ChunkedSum(torch.autograd.Function):
    """sum over row chunks of fn(*rows); gradients are computed chunk by chunk during the forward pass."""

    @staticmethod
    def forward(ctx, fn, rows, chunk, *tensors):  # tensors: [R, ...] row-aligned, rows: indices to use
        """The summed fn over the chunks of `rows`; each input's gradient is kept in a buffer as it goes."""
        need = ctx.needs_input_grad[3:]
        bufs = [torch.zeros_like(t) if n else None for t, n in zip(tensors, need)]
        total = None
        for start in range(0, rows.numel(), chunk):
            r = rows[start: start + chunk]
            parts = [t[r].detach().requires_grad_(n) for t, n in zip(tensors, need)]
            with torch.enable_grad():
                value = fn(*parts)
            wanted = [p for p, n in zip(parts, need) if n]
            if wanted:
                grads = iter(torch.autograd.grad(value, wanted))
                for buf, n in zip(bufs, need):
                    if n:
                        buf.index_copy_(0, r, next(grads).to(buf.dtype))
            total = value.detach() if total is None else total + value.detach()
        ctx.bufs = bufs
        return total

    @staticmethod
    def backward(ctx, grad_out):
        """The buffered gradients scaled by grad_out (no recomputation)."""
        grads = [None if b is None else (b if bool(grad_out == 1) else b * grad_out) for b in ctx.bufs]
        ctx.bufs = None
        return (None, None, None, *grads)


def masked_mean(
    chunk_sum: Callable[..., Tensor],
    tensors: Sequence[Tensor],
    mask: Tensor,
    dtype: torch.dtype,
    chunk_size: Optional[int],
) -> Tensor:
    """Mean over the unmasked positions of ``chunk_sum`` (which returns a chunk's summed per-token loss).

    ``tensors`` share the leading (masked) dimensions ``[...]`` of ``mask`` (bool ``[...]``); ``chunk_sum`` gets
    their unmasked rows ``[R, ...]`` and returns a scalar. ``chunk_size`` None (or >= the rows): one chunk.
    Returns a scalar of ``dtype``; with no unmasked position exactly 0 with a (zero) gradient path to every
    float input.
    """
    flat = [t.reshape(-1, *t.shape[mask.dim():]) for t in tensors]
    rows = mask.reshape(-1).nonzero().squeeze(1)
    n = rows.numel()
    if n == 0:
        # sums of empty tensors: exactly 0, and a (zero) gradient path to every float input
        zero = flat[0].new_zeros((), dtype=dtype)
        for t in flat:
            if t.is_floating_point():
                zero = zero + t[rows].to(dtype).sum()
        return zero
    if chunk_size is None or chunk_size >= n:
        return chunk_sum(*[t[rows] for t in flat]) / n
    return _ChunkedSum.apply(chunk_sum, rows, int(chunk_size), *flat) / n
