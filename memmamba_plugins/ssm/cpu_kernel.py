"""Fused CPU kernels of the selective scan (forward and backward), and of SS2D's depthwise conv
and SiLU at inference, compiled with numba.

Why numba: the scan is a recurrence over the sequence, so it cannot be written as a few large
tensor operations without paying for a ``(batch, dim, L, N)`` intermediate several times over
(memory-bound on a CPU). A fused loop touches every input once and keeps the state in L1. numba
compiles such loops to vectorised machine code at first use, ships as a binary wheel for every
platform torch supports, and needs no C++ toolchain on the user's machine.

Layout (channel-last, ``Dg`` channels per parameter group):

* ``u``     ``(batch, L, U, Dg)``  -- ``U`` is 1 when every scan order reads the same input (SS2D);
* ``delta`` ``(G, batch, L, Dg)``  -- raw step sizes (group-major: the layout a batched matmul of
  the step-size projection produces); the kernels add ``delta_bias`` ``(G, Dg)`` and apply
  softplus on the fly, so the biased / soft-plussed copy of this largest input is never stored.
  The forward kernel can instead take the step sizes in low-rank form, ``dt_low`` ``(batch, L, G, R)``
  and ``dt_weight`` ``(G, R, Dg)`` (Mamba's step-size projection), and form each step's row itself;
* ``A``     ``(G, N, Dg)``; ``B``, ``C`` ``(batch, L, G, N)``; ``D`` ``(G, Dg)``;
* ``y``     ``(batch, L, Y, Dg)``  -- ``Y`` is 1 when the orders' outputs are summed (SS2D).

A *scan order* ``s`` walks the ``L`` positions in the order ``positions[s]``, uses the parameters
of group ``group_of[s]``, reads ``u[..., u_of[s], :]``, adds its output to ``y[..., y_of[s], :]`` and
restarts from a zero state every ``segment[s]`` steps. Plain Mamba is one order per group in
sequence order; SS2D's four directions (and the Pyramid-Mamba sub-region scans, as segments) are
orders over the same grid, so no flipped, transposed or region-split copy of the map is made.

One task owns a block of contiguous channels of one batch element and runs every order for
them, so the sums over orders (``y``, ``grad_u``, ``grad_delta``) need no locks. The innermost
loops run over the block's channels (LLVM turns them into AVX/NEON code). Every step also has a
fixed cost (position lookup, row addressing, loop entries) about that of 128 channels' arithmetic,
so :func:`block_width` makes blocks as wide as the thread count allows. ``Dg`` must be a multiple
of ``LANES``; the caller pads other widths with zero channels.

Only float32 is compiled: :func:`_exp` is a float32 polynomial (relative error < 5e-7, checked in
the tests); float64 inputs go to the pure-PyTorch path instead.
"""

from __future__ import annotations

import os
import sys

import torch

# numba's OpenMP pool is created with NUMBA_NUM_THREADS threads (default: every core) the first
# time a parallel kernel runs, and its idle threads spin-wait between kernels even when fewer are
# asked for. Two processes on two cores with one torch thread each (CPU DDP, parallel jobs) then
# ran ~6x slower per step than one alone. Sizing the pool like torch's intra-op pool (which follows
# OMP_NUM_THREADS) before numba starts keeps the processes out of each other's way; an explicit
# NUMBA_NUM_THREADS, or numba already imported by someone else, is left alone.
if "NUMBA_NUM_THREADS" not in os.environ and "numba" not in sys.modules:
    os.environ["NUMBA_NUM_THREADS"] = str(max(1, torch.get_num_threads()))

import numba as nb  # noqa: E402  (after sizing its thread pool)
import numpy as np  # noqa: E402

#: Granule of the channel blocks (four AVX2 / two AVX-512 registers of float32): ``Dg`` is padded
#: to a multiple of it, and every block width is one.
LANES = 32
#: A step's fixed cost in units of one channel's arithmetic (measured: ~185 ns against ~1.3 ns
#: per channel on a Zen 3 core, d_state 1); :func:`block_width` weighs it against idle threads.
STEP_COST_IN_LANES = 128
#: Upper bound on ``width * d_state`` of one block: the per-task state buffers (and in the
#: backward pass the chunk's states and decays) must stay in L1/L2.
MAX_BLOCK_STATE = 2048
#: Steps between the states the backward pass keeps; a chunk's states and decays stay in L1/L2.
CHECKPOINT = 16

# Reassociation lets LLVM vectorise the lane reductions of the backward pass; no ``nnan``/``ninf``
# because the scan must keep IEEE semantics for large but finite values.
_FASTMATH = {"contract", "reassoc", "nsz", "arcp"}
#: numba's default ("python") error model guards every float division with a zero test that raises
#: ZeroDivisionError; that branch keeps LLVM from vectorising any loop with a division in it (the
#: softplus and sigmoid). The numpy model gives IEEE results (inf/nan) instead, as torch does.
_JIT = {"fastmath": _FASTMATH, "cache": True, "error_model": "numpy"}

#: Softplus is linear above this argument (torch.nn.functional.softplus's default threshold).
_SOFTPLUS_THRESHOLD = 20.0
#: ``q(e)`` with ``log1p(e) = e + e^2 q(e)`` on ``[0, 1]``, lowest power first: a degree-7
#: Chebyshev fit of ``(log1p(e) / e - 1) / e`` (from a float64 fit; float32 error below the exp's).
_LOG1P_Q: tuple[float, ...] = (
    -0.4999998211860657, 0.3333110213279724, -0.2494998425245285, 0.19561563432216644,
    -0.14697664976119995, 0.0910765752196312, -0.03774333745241165, 0.007363724056631327,
)  # fmt: skip

#: The float constants of :func:`_exp` and :func:`_softplus_and_slope`. The kernels take them as
#: an argument and unpack them into a tuple ``k`` (indexed by the names below) instead of having
#: them compiled in. Why: the step needs ~20 of them and AVX2 has 16 vector registers; compiled-in
#: constants were re-broadcast from the constant pool at every use (an address load and a
#: broadcast, two extra instructions each), while run-time values are broadcast once, spilled to
#: the stack and read as memory operands of the arithmetic at no extra cost. The step's loop is
#: bound by how many of its instructions the core can keep in flight: this made the forward kernel
#: ~20 % faster on MemoryMamba-tiny's four stage shapes (results bit for bit the same).
_MATH_CONSTANTS = np.array(
    [
        -87.0,  # exp's lower clamp: exp(-87) ~ 1.6e-38, just above the float32 normal range
        88.0,  # exp's upper clamp
        1.4426950408889634,  # log2(e)
        128.5,  # keeps x * log2(e) + 128.5 positive, so truncation rounds (128 is taken off again)
        0.693359375,  # ln(2), high part (Cody-Waite)
        -2.12194440e-4,  # ln(2), low part
        1.0,
        0.5,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        *_LOG1P_Q,
        _SOFTPLUS_THRESHOLD,
        0.0,
    ],
    dtype=np.float32,
)
_EXP_MIN, _EXP_MAX, _LOG2E, _ROUND, _LN2_HI, _LN2_LO, _ONE, _HALF, _INV6, _INV24, _INV120, _INV720 = range(12)
_Q0, _Q1, _Q2, _Q3, _Q4, _Q5, _Q6, _Q7, _THRESHOLD, _ZERO = range(12, 22)
_EXP_BIAS = np.int32(128)
if _MATH_CONSTANTS.size != _ZERO + 1:  # _unpack lists every entry by hand
    raise ImportError("cpu_kernel: _MATH_CONSTANTS and its index names disagree; update _unpack too.")


@nb.njit(inline="always", **_JIT)
def _unpack(consts):  # pragma: no cover - compiled
    """:data:`_MATH_CONSTANTS` as a tuple of float32 values (what the helpers below take as ``k``)."""
    return (
        consts[0], consts[1], consts[2], consts[3], consts[4], consts[5], consts[6], consts[7],
        consts[8], consts[9], consts[10], consts[11], consts[12], consts[13], consts[14], consts[15],
        consts[16], consts[17], consts[18], consts[19], consts[20], consts[21],
    )  # fmt: skip


@nb.njit(inline="always", **_JIT)
def _exp(x: np.float32, k) -> np.float32:  # pragma: no cover - compiled
    """float32 ``exp`` that LLVM can vectorise (Cody-Waite reduction + degree-6 Taylor).

    Every integer step is kept in int32 on purpose: numba widens int arithmetic to int64, and
    int64 -> float32 conversion has no AVX2 instruction, which would make the loop scalar.
    The polynomial is evaluated in Estrin's form: the scan's step is one long chain of dependent
    operations (softplus, then this exp), and Horner's six sequential FMAs were the longest link.
    """
    x = min(max(x, k[_EXP_MIN]), k[_EXP_MAX])  # vmaxps/vminps; inputs were checked to be finite
    n = np.int32(np.int32(x * k[_LOG2E] + k[_ROUND]) - _EXP_BIAS)
    nf = np.float32(n)
    r = x - nf * k[_LN2_HI] - nf * k[_LN2_LO]
    r2 = r * r
    low = k[_ONE] + r + r2 * (k[_HALF] + k[_INV6] * r)
    high = k[_INV24] + k[_INV120] * r + k[_INV720] * r2
    p = low + (r2 * r2) * high
    scale = np.int32(np.int32(n + np.int32(127)) << np.int32(23)).view(np.float32)
    return p * scale


@nb.njit(inline="always", **_JIT)
def _softplus_and_slope(x: np.float32, k) -> tuple[np.float32, np.float32]:  # pragma: no cover - compiled
    """``softplus(x) = log(1 + exp(x))`` (threshold 20, as torch) and its slope ``sigmoid(x)``.

    Both come from one ``e = exp(-|x|)`` in ``(0, 1]``: ``softplus = max(x, 0) + log1p(e)`` with
    ``log1p(e)`` a polynomial in ``e`` (:data:`_LOG1P_Q`) -- unlike libm's ``log1p`` it vectorises,
    and unlike a series in ``e / (2 + e)`` it needs no division, which the forward pass would pay
    at every step. ``sigmoid`` is ``1 / (1 + e)`` or ``e / (1 + e)`` by the sign, free of overflow
    and cancellation. NaN propagates (the threshold comparison is false for it). Callers that use
    one result only pay for it: the other is dead code after inlining.
    """
    e = _exp(-abs(x), k)
    e2 = e * e
    # Estrin's form of q(e), as in :func:`_exp`: depth 3 instead of 7 dependent FMAs
    q = (k[_Q0] + k[_Q1] * e + (k[_Q2] + k[_Q3] * e) * e2) + (
        k[_Q4] + k[_Q5] * e + (k[_Q6] + k[_Q7] * e) * e2
    ) * (e2 * e2)
    r = max(x, k[_ZERO]) + (e + e2 * q)
    slope = (k[_ONE] if x >= k[_ZERO] else e) / (k[_ONE] + e)
    return (r if x <= k[_THRESHOLD] else x), slope


@nb.njit(inline="always", **_JIT)
def _softplus(x: np.float32, k) -> np.float32:  # pragma: no cover - compiled
    return _softplus_and_slope(x, k)[0]


@nb.njit(inline="always", **_JIT)
def _sigmoid(x: np.float32, k) -> np.float32:  # pragma: no cover - compiled
    return _softplus_and_slope(x, k)[1]


#: Scalar helpers :func:`elementwise_float32` applies, by name.
ELEMENTWISE_OPS: tuple[str, ...] = ("exp", "softplus", "sigmoid")


@nb.njit(**_JIT)
def _elementwise(x, op, consts):  # pragma: no cover - compiled
    k = _unpack(consts)
    out = np.empty_like(x)
    for i in range(x.size):
        v = x[i]
        if op == 0:
            out[i] = _exp(v, k)
        elif op == 1:
            out[i] = _softplus(v, k)
        else:
            out[i] = _sigmoid(v, k)
    return out


def elementwise_float32(x: np.ndarray, name: str) -> np.ndarray:
    """One of the kernels' float32 ``exp`` / ``softplus`` / ``sigmoid`` over a 1-D float32 array.

    The scan inlines these; this entry exists so the tests can check their accuracy directly.
    """
    return _elementwise(x, ELEMENTWISE_OPS.index(name), _MATH_CONSTANTS)


@nb.njit(inline="always", **_JIT)
def _load_group(A, D, delta_bias, g, d0, a, skip, bias):  # pragma: no cover - compiled
    """Copy group ``g``'s ``A`` (N, width), ``D`` and ``delta_bias`` (width,) for channels from ``d0`` on."""
    lanes = a.shape[1]
    for n in range(a.shape[0]):
        for j in range(lanes):
            a[n, j] = A[g, n, d0 + j]
    for j in range(lanes):
        skip[j] = D[g, d0 + j]
        bias[j] = delta_bias[g, d0 + j]


@nb.njit(inline="always", **_JIT)
def _step_size(raw: np.float32, bias: np.float32, delta_softplus: bool, k) -> np.float32:  # pragma: no cover
    """``softplus(raw + bias)``, or ``raw + bias`` without softplus (a select, so the loop stays vectorised)."""
    v = raw + bias
    sp = _softplus(v, k)
    return sp if delta_softplus else v


@nb.njit(inline="always", **_JIT)
def _task_buffers(n_state, lanes):  # pragma: no cover - compiled
    """A task's buffers common to both kernels: ``A`` and state ``(N, width)``; ``D``, bias, step size, drive ``(width,)``."""
    state_shape = (n_state, lanes)
    return (
        np.zeros(state_shape, np.float32),
        np.zeros(state_shape, np.float32),
        np.zeros(lanes, np.float32),
        np.zeros(lanes, np.float32),
        np.zeros(lanes, np.float32),
        np.zeros(lanes, np.float32),
    )


@nb.njit(inline="always", **_JIT)
def _load_step(u_row, delta_row, bias, delta_softplus, dtv, drive, k):  # pragma: no cover - compiled
    """Step sizes ``dtv`` and inputs ``drive = dt * u`` of one position for one block of channels."""
    for j in range(dtv.shape[0]):
        dtv[j] = _step_size(delta_row[j], bias[j], delta_softplus, k)
        drive[j] = dtv[j] * u_row[j]


@nb.njit(inline="always", **_JIT)
def _single_state_step(
    u_row, delta_row, y_row, bias, skip, a, h, b, c, delta_softplus, k
):  # pragma: no cover
    """One forward step of a block with ``d_state == 1``.

    Updates ``h`` in place, adds the outputs to ``y_row`` and returns their sum (see :func:`scan_forward`).
    """
    total = np.float32(0.0)
    for j in range(h.shape[0]):
        uj = u_row[j]
        dt = _step_size(delta_row[j], bias[j], delta_softplus, k)
        hv = _exp(dt * a[j], k) * h[j] + dt * uj * b
        h[j] = hv
        out = skip[j] * uj + c * hv
        y_row[j] += out
        total += out
    return total


@nb.njit(inline="always", **_JIT)
def _low_rank_row(low, weight, blk, row):  # pragma: no cover - compiled
    """``row = low @ weight[:, blk]``: one position's raw step sizes for one block, ``R`` FMAs per channel."""
    w0 = weight[0, blk]
    x0 = low[0]
    for j in range(row.shape[0]):
        row[j] = x0 * w0[j]
    for r in range(1, low.shape[0]):
        wr = weight[r, blk]
        xr = low[r]
        for j in range(row.shape[0]):
            row[j] += xr * wr[j]


@nb.njit(parallel=True, **_JIT)
def _scan_forward(
    u, delta, dt_low, dt_weight, A, B, C, D, delta_bias, delta_softplus, positions, segment, group_of, u_of, y_of,
    first_write, y, last_state, totals, consts,
):  # fmt: skip  # pragma: no cover - compiled
    """:func:`scan_forward` on the channel-blocked views (last axis split into ``(blocks, width)``)."""
    batch, length = u.shape[0], u.shape[1]
    blocks, lanes = u.shape[3], u.shape[4]
    n_state = A.shape[1]
    orders = positions.shape[0]
    low_rank = dt_weight.shape[1] > 0
    for task in nb.prange(batch * blocks):
        b = task // blocks
        blk = task % blocks
        d0 = blk * lanes
        a, h, skip, bias, dtv, drive = _task_buffers(n_state, lanes)
        k = _unpack(consts)
        acc = np.zeros(lanes, np.float32)
        raw = np.zeros(lanes, np.float32)
        total = np.float32(0.0)
        for s in range(orders):
            g = group_of[s]
            ui = u_of[s]
            yi = y_of[s]
            seg = segment[s]
            sets_output = first_write[s]
            _load_group(A, D, delta_bias, g, d0, a, skip, bias)
            h0, a0 = h[0], a[0]  # the d_state=1 rows, taken once per order rather than per step
            count = 0
            for t in range(length):
                if count == 0:
                    h[:] = 0.0
                count += 1
                if count == seg:
                    count = 0
                p = positions[s, t]
                u_row = u[b, p, ui, blk]
                if low_rank:
                    _low_rank_row(dt_low[b, p, g], dt_weight[g], blk, raw)
                    delta_row = raw
                else:
                    delta_row = delta[g, b, p, blk]
                y_row = y[b, p, yi, blk]
                if sets_output:
                    # this order reaches every row of its output slot first: clearing the row here,
                    # while it is in cache anyway, replaces a zeroing pass over the whole output
                    y_row[:] = 0.0
                if n_state == 1:
                    # VMamba's d_state=1 models: the whole step in one pass over the channels,
                    # with no scratch rows between the step size, the state and the output; the
                    # constant flag lets LLVM drop the unused step-size variant from the loop
                    b0, c0 = B[b, p, g, 0], C[b, p, g, 0]
                    if delta_softplus:
                        added = _single_state_step(
                            u_row, delta_row, y_row, bias, skip, a0, h0, b0, c0, True, k
                        )
                    else:
                        added = _single_state_step(
                            u_row, delta_row, y_row, bias, skip, a0, h0, b0, c0, False, k
                        )
                    total += added
                    continue
                _load_step(u_row, delta_row, bias, delta_softplus, dtv, drive, k)
                for j in range(lanes):
                    acc[j] = skip[j] * u_row[j]
                for n in range(n_state):
                    bn = B[b, p, g, n]
                    cn = C[b, p, g, n]
                    for j in range(lanes):
                        hv = _exp(dtv[j] * a[n, j], k) * h[n, j] + drive[j] * bn
                        h[n, j] = hv
                        acc[j] += cn * hv
                for j in range(lanes):
                    y_row[j] += acc[j]
                    total += acc[j]
            for n in range(n_state):
                for j in range(lanes):
                    last_state[b, s, d0 + j, n] = h[n, j]
        totals[task] = total


def block_width(batch: int, dg: int, n_state: int, threads: int) -> int:
    """Channels per task: the multiple of :data:`LANES` dividing ``dg`` with the least estimated time.

    Time is ``rounds * (STEP_COST_IN_LANES + width)``, where ``rounds`` is the number of tasks per
    thread (rounded up): wide blocks amortise the fixed step cost, narrow ones keep every thread
    busy. With batch 1 this makes one task per thread; with a training batch, the widest block.

    Args:
        batch: batch size of the call.
        dg: channels per parameter group (a multiple of :data:`LANES`).
        n_state: state size ``N``; ``width * n_state`` stays within :data:`MAX_BLOCK_STATE`.
        threads: threads the kernel runs on.

    Raises:
        ValueError: ``dg`` is not a multiple of :data:`LANES`.
    """
    if dg % LANES:
        raise ValueError(f"the CPU kernel needs a multiple of {LANES} channels per group, got {dg}.")
    best, best_time = LANES, None
    for width in range(LANES, dg + 1, LANES):
        if dg % width or (width > LANES and width * n_state > MAX_BLOCK_STATE):
            continue
        rounds = -(-(batch * (dg // width)) // max(1, threads))
        time = rounds * (STEP_COST_IN_LANES + width)
        if best_time is None or time <= best_time:
            best, best_time = width, time
    return best


def _by_block(x: np.ndarray, width: int) -> np.ndarray:
    """View of a C-contiguous array with its last axis split into ``(blocks, width)``.

    The kernels index one block of one position as a whole row, so the inner loops see a unit-stride
    row with a non-negative index: with ``x[..., d0 + j]`` LLVM had to keep numba's negative-index
    wrap-around and aliasing checks in every step, which cost more than the arithmetic.
    """
    return x.reshape(x.shape[:-1] + (x.shape[-1] // width, width))


def scan_forward(
    u, delta, A, B, C, D, delta_bias, delta_softplus, positions, segment, group_of, u_of, y_of, first_write, y,
    last_state, delta_weight=None,
) -> bool:  # fmt: skip
    """Forward scan of every order; adds into ``y``, except where ``first_write`` says to set it.

    Args:
        u, delta, A, B, C, D, delta_bias: see the module docstring (C-contiguous float32 arrays).
        delta_softplus: step size ``softplus(delta + delta_bias)`` instead of ``delta + delta_bias``.
        positions: ``(S, L)`` int64, the position visited at each step of order ``s``.
        segment: ``(S,)`` int64, the state restarts from zero every ``segment[s]`` steps.
        group_of, u_of, y_of: ``(S,)`` int64, parameter group / input slot / output slot of ``s``.
        first_write: ``(S,)`` bool, order ``s`` sets the rows it reaches instead of adding to them
            (for an order that runs first on its slot and visits every position once, so that
            slot need not be zeroed; see :attr:`ScanOrders.first_writes`).
        y: ``(batch, L, Y, Dg)`` float32, accumulated; slots without a first write must be zeroed.
        last_state: ``(batch, S, Dg, N)`` float32, the state after each order's last step.
        delta_weight: ``(G, R, Dg)``, or ``None``. When given, ``delta`` is ``(batch, L, G, R)`` and
            the raw step sizes are ``delta[b, l, g] @ delta_weight[g]``, formed step by step.

    Returns:
        Whether every output the scan added was finite. Each task sums what it adds as it goes (a
        NaN or Inf anywhere makes the sum non-finite), so the caller needs no second pass over ``y``.
    """
    width = block_width(u.shape[0], u.shape[3], A.shape[1], nb.get_num_threads())
    totals = np.empty(u.shape[0] * (u.shape[3] // width), np.float32)
    if delta_weight is None:
        delta, dt_low, dt_weight = _by_block(delta, width), _NO_LOW_RANK, _NO_LOW_RANK
    else:
        delta, dt_low, dt_weight = _NO_DELTA, delta, _by_block(delta_weight, width)
    _scan_forward(
        _by_block(u, width), delta, dt_low, dt_weight, A, B, C, D, delta_bias, delta_softplus,
        positions, segment, group_of, u_of, y_of, first_write, _by_block(y, width), last_state, totals,
        _MATH_CONSTANTS,
    )  # fmt: skip
    return bool(np.isfinite(totals.sum(dtype=np.float64)))


#: Stand-ins for the step-size inputs of the form a call does not use (the kernel is compiled once
#: for both forms; ``R = 0`` selects the full ``delta``).
_NO_DELTA = np.zeros((0, 0, 0, 0, 0), np.float32)
_NO_LOW_RANK = np.zeros((0, 0, 0, 0), np.float32)


@nb.njit(parallel=True, **_JIT)
def _scan_backward(
    u,
    delta,
    A,
    B,
    C,
    D,
    delta_bias,
    delta_softplus,
    positions,
    segment,
    group_of,
    u_of,
    y_of,
    grad_y,
    grad_last,
    grad_u,
    grad_delta,
    grad_A_part,
    grad_B_part,
    grad_C_part,
    grad_D_part,
    consts,
):  # pragma: no cover - compiled
    """:func:`scan_backward` on the channel-blocked views (see :func:`_by_block`)."""
    batch, length = u.shape[0], u.shape[1]
    blocks, lanes = u.shape[3], u.shape[4]
    n_state = A.shape[1]
    orders = positions.shape[0]
    n_chunks = (length + CHECKPOINT - 1) // CHECKPOINT
    for task in nb.prange(batch * blocks):
        b = task // blocks
        blk = task % blocks
        d0 = blk * lanes
        a, h, skip, bias, dtv, drive = _task_buffers(n_state, lanes)
        k = _unpack(consts)
        gh = np.zeros((n_state, lanes), np.float32)
        g_a = np.zeros((n_state, lanes), np.float32)
        checkpoints = np.zeros((n_chunks, n_state, lanes), np.float32)
        states = np.zeros((CHECKPOINT, n_state, lanes), np.float32)
        decays = np.zeros((CHECKPOINT, n_state, lanes), np.float32)
        zero = np.zeros((n_state, lanes), np.float32)
        slope = np.zeros(lanes, np.float32)
        uv = np.zeros(lanes, np.float32)
        gyv = np.zeros(lanes, np.float32)
        g_u = np.zeros(lanes, np.float32)
        g_dt = np.zeros(lanes, np.float32)
        g_d = np.zeros(lanes, np.float32)
        for s in range(orders):
            g = group_of[s]
            ui = u_of[s]
            yi = y_of[s]
            seg = segment[s]
            _load_group(A, D, delta_bias, g, d0, a, skip, bias)
            g_d[:] = 0.0
            g_a[:] = 0.0
            # pass 1: the state entering every chunk
            h[:] = 0.0
            for t in range(length):
                if t % CHECKPOINT == 0:
                    checkpoints[t // CHECKPOINT] = h
                if t % seg == 0:
                    h[:] = 0.0
                p = positions[s, t]
                _load_step(u[b, p, ui, blk], delta[g, b, p, blk], bias, delta_softplus, dtv, drive, k)
                for n in range(n_state):
                    bn = B[b, p, g, n]
                    for j in range(lanes):
                        h[n, j] = _exp(dtv[j] * a[n, j], k) * h[n, j] + drive[j] * bn
            # pass 2: chunks from last to first
            for n in range(n_state):
                for j in range(lanes):
                    gh[n, j] = grad_last[b, s, d0 + j, n]
            for c in range(n_chunks - 1, -1, -1):
                t0 = c * CHECKPOINT
                t1 = min(length, t0 + CHECKPOINT)
                h[:] = checkpoints[c]
                for t in range(t0, t1):
                    if t % seg == 0:
                        h[:] = 0.0
                    p = positions[s, t]
                    _load_step(u[b, p, ui, blk], delta[g, b, p, blk], bias, delta_softplus, dtv, drive, k)
                    i = t - t0
                    for n in range(n_state):
                        bn = B[b, p, g, n]
                        for j in range(lanes):
                            e = _exp(dtv[j] * a[n, j], k)
                            hv = e * h[n, j] + drive[j] * bn
                            h[n, j] = hv
                            decays[i, n, j] = e
                            states[i, n, j] = hv
                for t in range(t1 - 1, t0 - 1, -1):
                    p = positions[s, t]
                    i = t - t0
                    u_row = u[b, p, ui, blk]
                    delta_row = delta[g, b, p, blk]
                    gy_row = grad_y[b, p, yi, blk]
                    for j in range(lanes):
                        v = delta_row[j] + bias[j]
                        sp, sig = _softplus_and_slope(v, k)
                        dtv[j] = sp if delta_softplus else v
                        slope[j] = sig if delta_softplus else np.float32(1.0)
                        uv[j] = u_row[j]
                        gyv[j] = gy_row[j]
                        g_u[j] = skip[j] * gyv[j]
                        g_dt[j] = 0.0
                        g_d[j] += gyv[j] * uv[j]
                    restart = t % seg == 0
                    if restart:
                        prev = zero
                    elif i > 0:
                        prev = states[i - 1]
                    else:
                        prev = checkpoints[c]
                    for n in range(n_state):
                        bn = B[b, p, g, n]
                        cn = C[b, p, g, n]
                        acc_c = np.float32(0.0)
                        acc_b = np.float32(0.0)
                        for j in range(lanes):
                            acc_c += gyv[j] * states[i, n, j]
                            ghv = gh[n, j] + cn * gyv[j]
                            e = decays[i, n, j]
                            ghe_h = ghv * e * prev[n, j]
                            g_dt[j] += a[n, j] * ghe_h + ghv * bn * uv[j]
                            g_a[n, j] += dtv[j] * ghe_h
                            g_u[j] += ghv * dtv[j] * bn
                            acc_b += ghv * dtv[j] * uv[j]
                            gh[n, j] = ghv * e
                        grad_C_part[b, blk, p, g, n] += acc_c
                        grad_B_part[b, blk, p, g, n] += acc_b
                    if restart:
                        gh[:] = 0.0
                    gu_row = grad_u[b, p, ui, blk]
                    gdelta_row = grad_delta[g, b, p, blk]
                    for j in range(lanes):
                        gu_row[j] += g_u[j]
                        gdelta_row[j] += g_dt[j] * slope[j]
            for n in range(n_state):
                for j in range(lanes):
                    grad_A_part[b, g, n, d0 + j] += g_a[n, j]
            for j in range(lanes):
                grad_D_part[b, g, d0 + j] += g_d[j]


def scan_backward(
    u, delta, A, B, C, D, delta_bias, delta_softplus, positions, segment, group_of, u_of, y_of,
    grad_y, grad_last, grad_u, grad_delta, grad_A_part, grad_B_part, grad_C_part, grad_D_part,
) -> None:  # fmt: skip
    """Backward scan: per chunk of ``CHECKPOINT`` steps, recompute the states, then sweep back.

    Args:
        u, delta, A, B, C, D, delta_bias, delta_softplus, positions, segment, group_of, u_of, y_of:
            as :func:`scan_forward`.
        grad_y: ``(batch, L, Y, Dg)``; grad_last: ``(batch, S, Dg, N)``.
        grad_u: ``(batch, L, U, Dg)``; grad_delta: ``(G, batch, L, Dg)``, the gradient of the raw
            ``delta`` (through the softplus); both accumulated.
        grad_A_part: ``(batch, G, N, Dg)``; grad_D_part: ``(batch, G, Dg)``; accumulated, summed
            over batch by the caller.
        grad_B_part, grad_C_part: ``(batch, blocks, L, G, N)`` with ``blocks`` from :func:`blocks_for`
            (it sets the block width); accumulated, summed over channel
            blocks by the caller (blocks of one group share ``B`` and ``C``).
        All outputs must be zeroed by the caller.
    """
    width = u.shape[3] // grad_B_part.shape[1]
    _scan_backward(
        _by_block(u, width), _by_block(delta, width), A, B, C, D, delta_bias, delta_softplus,
        positions, segment, group_of, u_of, y_of, _by_block(grad_y, width), grad_last,
        _by_block(grad_u, width), _by_block(grad_delta, width),
        grad_A_part, grad_B_part, grad_C_part, grad_D_part, _MATH_CONSTANTS,
    )  # fmt: skip


def blocks_for(batch: int, dg: int, n_state: int) -> int:
    """Number of channel blocks :func:`scan_backward` uses (the shape of its ``grad_B/C`` buffers)."""
    return dg // block_width(batch, dg, n_state, nb.get_num_threads())


# -- SS2D's depthwise convolution and SiLU at inference -------------------------------------------
# Between its in-projection and the scan, SS2D runs a depthwise conv, an optional per-channel
# offset computed from the conv output's spatial mean (MemoryMamba's memory read-out), and a SiLU.
# As separate torch operations that is four passes over the map (conv, mean, add, SiLU) plus the
# temporaries; these two kernels do it in two, which matters because at batch 1 the passes are
# bound by memory bandwidth. Inference only: training keeps the torch operations and autograd.


@nb.njit(parallel=True, **_JIT)
def _depthwise_conv(x, weight, bias, out, row_sums):  # pragma: no cover - compiled
    """:func:`depthwise_conv`; ``row_sums`` ``(batch * H, D)`` float64 gets each output row's sum."""
    batch, height, width, channels = x.shape
    size = weight.shape[0]
    reach = size // 2
    for task in nb.prange(batch * height):
        b = task // height
        i = task % height
        sums = row_sums[task]
        sums[:] = 0.0
        for j in range(width):
            row = out[b, i, j]
            row[:] = bias
            for di in range(size):
                ii = i + di - reach
                if ii < 0 or ii >= height:
                    continue
                for dj in range(size):
                    jj = j + dj - reach
                    if jj < 0 or jj >= width:
                        continue
                    tap = weight[di, dj]
                    source = x[b, ii, jj]
                    for c in range(channels):
                        row[c] += tap[c] * source[c]
            for c in range(channels):
                sums[c] += row[c]


def depthwise_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Depthwise ``k x k`` convolution, stride 1, zero padding ``k // 2``, channel-last.

    Args:
        x: ``(batch, H, W, D)`` float32, C-contiguous.
        weight: ``(k, k, D)`` float32 (``k`` odd): ``Conv2d(D, D, k, groups=D).weight[:, 0]`` moved
            channel-last.
        bias: ``(D,)`` float32 (zeros for a conv without bias).
        out: ``(batch, H, W, D)`` float32, written.

    Returns:
        ``(batch, D)`` float64: the sum of ``out`` over the positions (for its spatial mean).
    """
    batch, height = x.shape[0], x.shape[1]
    row_sums = np.empty((batch * height, x.shape[3]), np.float64)
    _depthwise_conv(x, weight, bias, out, row_sums)
    return row_sums.reshape(batch, height, -1).sum(axis=1)


@nb.njit(parallel=True, **_JIT)
def _offset_silu(out, offset, consts):  # pragma: no cover - compiled
    """:func:`offset_silu` on ``(batch, H, W, D)``."""
    batch, height, width, channels = out.shape
    k = _unpack(consts)
    for task in nb.prange(batch * height):
        b = task // height
        i = task % height
        shift = offset[b]
        for j in range(width):
            row = out[b, i, j]
            for c in range(channels):
                v = row[c] + shift[c]
                row[c] = v * _sigmoid(v, k)


def offset_silu(out: np.ndarray, offset: np.ndarray) -> None:
    """In place: ``out = silu(out + offset[b])`` for ``out`` ``(batch, H, W, D)``, ``offset`` ``(batch, D)`` float32."""
    _offset_silu(out, offset, _MATH_CONSTANTS)
