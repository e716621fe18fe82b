"""Strided convolutions as stride-1 convolutions over space-to-depth blocks (exact).

A k×k stride-s convolution with padding p reads, for output row i, input rows s·i + t − p
(t < k). Writing t − p = s·q + r (0 ≤ r < s) splits that into the block ``q`` of ``s`` input
rows and the row ``r`` within it: on the input reshuffled into s×s blocks (``space_to_depth``:
(B, H, W, C) → (B, H/s, W/s, s·s·C)) the same convolution is a stride-1 one with a K×K kernel,
K = ⌊(k−1−p)/s⌋ + ⌈p/s⌉ + 1, over s·s·C channels. Its kernel is the k×k one zero-padded to
K·s taps (in front by s·⌈p/s⌉ − p) and reshaped; the padding becomes ⌈p/s⌉ zero blocks in
front (plus whatever whole blocks the last windows need at the end). Every product of the
original convolution appears once; the others have a zero weight, or read zero padding the
original also reads: the results are those of ``lax.conv_general_dilated`` up to the order of
the summation.

This is the MLPerf ResNet-on-TPU stem trick. What it works around: XLA:TPU lowers a strided
convolution with few input channels (the stems' 7×7/4 ``proj`` on 64 and 16 channels at 480²)
by expanding its windows into large intermediate buffers in HBM (``bf16[480,32,60,64,7]``,
826 MB each in the release train step, read and written by several instructions forward and
backward), and stores the narrow channel dimension padded to 128 lanes. The stride-1 2×2
convolution over 16·C dense channels needs neither; the reshuffle is one transpose of the
input (and one of its gradient). What it costs: the zero taps, (K·s)²/k² of the convolution's
FLOPs (64/49 for 7×7/4: +31 % of ``proj``'s FLOPs, under 1 % of the release step's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CONV_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def space_to_depth(x: jax.Array, s: int) -> jax.Array:
    """(B, H, W, C) → (B, H/s, W/s, s·s·C), channels ordered (row in block, column, C).
    H and W must be multiples of ``s``."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // s, w // s, s * s * c)


def _kernel_geometry(k: int, s: int, p: int) -> tuple[int, int, int]:
    """Along one spatial axis of a k-tap, stride-s, padding-p convolution: (kernel taps in
    blocks K, zero taps in front of the k-tap kernel, zero blocks in front of the input)."""
    front = -(-p // s)  # ⌈p/s⌉
    return (k - 1 - p) // s + front + 1, s * front - p, front


def space_to_depth_kernel(w: jax.Array, stride: int, padding: int) -> jax.Array:
    """The HWIO kernel (kh, kw, C, O) of a stride-``stride`` convolution with ``padding`` as
    the kernel (Kh, Kw, s·s·C, O) of the stride-1 convolution over :func:`space_to_depth`
    blocks (zero taps where the original has none)."""
    kh, kw, c, o = w.shape
    s = stride
    th, zh, _ = _kernel_geometry(kh, s, padding)
    tw, zw, _ = _kernel_geometry(kw, s, padding)
    w = jnp.pad(w, ((zh, th * s - kh - zh), (zw, tw * s - kw - zw), (0, 0), (0, 0)))
    w = w.reshape(th, s, tw, s, c, o).transpose(0, 2, 1, 3, 4, 5)
    return w.reshape(th, tw, s * s * c, o)


def _block_padding(n: int, k: int, s: int, p: int) -> tuple[int, tuple[int, int]]:
    """(outputs, (zero blocks in front, zero blocks at the end)) along an input axis of length
    ``n`` (its last block completed with zeros)."""
    out = (n + 2 * p - k) // s + 1
    taps, _, front = _kernel_geometry(k, s, p)
    blocks = -(-n // s)
    return out, (front, max(0, out - 1 + taps - front - blocks))


def on_blocks(
    w: jax.Array, stride: int, padding: int, size: tuple[int, int]
) -> tuple[jax.Array, tuple[tuple[int, int], tuple[int, int]], tuple[int, int]]:
    """What a stride-``stride`` convolution with HWIO kernel ``w`` (kh, kw, C, O) and symmetric
    ``padding`` over an (H, W) = ``size`` input becomes on its :func:`space_to_depth` blocks
    (the input zero-padded to whole blocks): (the kernel (Kh, Kw, s·s·C, O) of the stride-1
    convolution, its padding in blocks ((top, bottom), (left, right)), the output size
    (H', W'), to which the stride-1 convolution's output is cropped)."""
    kh, kw = w.shape[:2]
    oh, pad_h = _block_padding(size[0], kh, stride, padding)
    ow, pad_w = _block_padding(size[1], kw, stride, padding)
    return space_to_depth_kernel(w, stride, padding), (pad_h, pad_w), (oh, ow)


def conv2d_space_to_depth(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
    """PyTorch ``F.conv2d`` (groups 1, symmetric ``padding``, no bias) on NHWC ``x``
    (B, H, W, C) with HWIO kernel ``w`` (kh, kw, C, O), computed as a stride-1 convolution
    over ``stride``×``stride`` space-to-depth blocks (module docstring). Any H, W, kernel size
    and padding; (B, H', W', O) as ``lax.conv_general_dilated`` gives it."""
    h, wd = x.shape[1], x.shape[2]
    s = stride
    kernel, pad, (oh, ow) = on_blocks(w, s, padding, (h, wd))
    x = jnp.pad(x, ((0, 0), (0, -h % s), (0, -wd % s), (0, 0)))
    y = jax.lax.conv_general_dilated(
        space_to_depth(x, s), kernel, (1, 1), pad, dimension_numbers=CONV_DIMENSIONS
    )
    return y[:, :oh, :ow]
