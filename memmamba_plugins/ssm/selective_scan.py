"""Selective scan with one interface and several implementations.

:func:`selective_scan` has the signature, shapes and semantics of mamba-ssm's
``selective_scan_fn`` (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", 2023). It dispatches to

* ``"mamba_ssm"`` -- mamba-ssm's fused CUDA kernel (CUDA tensors, ``mamba-ssm`` installed);
* ``"numba"``     -- the fused CPU kernel of :mod:`memmamba_plugins.ssm.cpu_kernel` (CPU tensors,
  float32 / float16 / bfloat16);
* ``"torch"``     -- a chunked parallel scan in plain tensor operations: runs on any device and
  dtype, is traceable (ONNX / TorchScript export) and differentiable by autograd;
* ``"reference"`` -- :func:`memmamba_plugins.ssm.reference.selective_scan_ref`, one Python step per
  element (tests and debugging only).

``backend=None`` (or ``"auto"``) picks the first that applies: ``"torch"`` while tracing,
scripting, exporting or compiling; ``"mamba_ssm"`` for CUDA tensors when mamba-ssm imports,
else ``"torch"``; ``"numba"`` for CPU tensors of a float type it compiles; ``"torch"`` otherwise.
The environment variable ``MEMMAMBA_SCAN_BACKEND`` sets the default for ``backend=None``.

Non-finite values: the CPU backends raise :class:`ValueError` naming the input that holds
NaN/Inf (the scan would otherwise smear it over the rest of the sequence). The CUDA kernel is
not checked -- a check would force a device synchronisation per call -- and propagates them.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import expand_groups, selective_scan_ref

Backend = Literal["auto", "mamba_ssm", "numba", "torch", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "mamba_ssm", "numba", "torch", "reference")
BACKEND_ENV = "MEMMAMBA_SCAN_BACKEND"

#: Chunk length of the pure-PyTorch scan: log2(CHUNK) doubling steps inside a chunk, then a scan
#: over chunk carries. 64 keeps the intermediates small and the traced graph short.
CHUNK = 64

_NUMBA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def mamba_ssm_available() -> bool:
    """True when mamba-ssm's CUDA selective-scan kernel can be imported."""
    if importlib.util.find_spec("mamba_ssm") is None:
        return False
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception:  # mamba-ssm installed without its compiled extension
        return False
    return True


@functools.cache
def numba_available() -> bool:
    """True when the numba CPU kernel can be imported."""
    if importlib.util.find_spec("numba") is None:
        return False
    try:
        from . import cpu_kernel  # noqa: F401
    except Exception:
        return False
    return True


def _is_exporting() -> bool:
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    if torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def resolve_backend(backend: str | None, u: Tensor) -> str:
    """Return the concrete backend :func:`selective_scan` will use for input ``u``.

    Raises:
        ValueError: unknown backend name, or a backend that cannot run these inputs.
    """
    requested = backend or os.environ.get(BACKEND_ENV) or "auto"
    if requested not in BACKENDS:
        raise ValueError(f"Unknown selective-scan backend {requested!r}; choose one of {BACKENDS}.")
    if requested == "auto":
        if _is_exporting():
            return "torch"
        if u.is_cuda:
            return "mamba_ssm" if mamba_ssm_available() else "torch"
        if u.device.type == "cpu" and u.dtype in _NUMBA_DTYPES and numba_available():
            return "numba"
        return "torch"
    if requested == "mamba_ssm":
        if not u.is_cuda:
            raise ValueError("backend='mamba_ssm' needs CUDA tensors; use backend='numba' or 'torch' on CPU.")
        if not mamba_ssm_available():
            raise ValueError(
                "backend='mamba_ssm' needs mamba-ssm with its CUDA extension: "
                "pip install 'memmamba-plugins[cuda]' on a machine with CUDA, or use backend='torch'."
            )
    if requested == "numba":
        if u.device.type != "cpu" or u.dtype not in _NUMBA_DTYPES:
            raise ValueError(
                f"backend='numba' runs float32/float16/bfloat16 CPU tensors, got {u.dtype} on {u.device}; "
                "use backend='torch'."
            )
        if not numba_available():
            raise ValueError("backend='numba' needs the numba package: pip install numba.")
    return requested


def _check_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, L), got shape {tuple(u.shape)}.")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}.")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have the shape of u {tuple(u.shape)}, got {tuple(z.shape)}.")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, N), got shape {tuple(A.shape)}.")
    if A.is_complex():
        raise ValueError("complex A is not supported; pass a real (dim, N) A.")
    n_state = A.shape[1]
    for name, mat in (("B", B), ("C", C)):
        if mat.dim() == 3:
            ok = mat.shape == (batch, n_state, length)
        elif mat.dim() == 4:
            ok = mat.shape[0] == batch and mat.shape[2:] == (n_state, length) and dim % mat.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} must be (batch={batch}, N={n_state}, L={length}) or (batch, groups, N, L) with groups "
                f"dividing dim={dim}; got {tuple(mat.shape)}."
            )
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and vec.shape != (dim,):
            raise ValueError(f"{name} must be (dim={dim},), got {tuple(vec.shape)}.")


def _check_finite(**tensors: Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    # One sum per tensor is a single vectorised pass; a NaN/Inf anywhere makes it non-finite.
    # Only when a sum is non-finite (or overflowed) is the exact, slower test run. Summing in the
    # tensor's own dtype avoids a converted copy; an overflow only costs the exact test.
    sums = torch.stack([t.detach().sum().float() for t in present.values()])
    if bool(torch.isfinite(sums).all()):
        return
    for name, tensor in present.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"selective_scan: input {name!r} contains NaN or Inf. The scan would spread it over the rest "
                "of the sequence; check the layer feeding it (learning rate, loss scale, input normalisation)."
            )


def _scan_torch(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """``y = <C, h>`` and the last state, by a chunked doubling scan (no loop over L)."""
    # plain ints: the traced graph is specialised to the example's length anyway
    batch, dim, length = (int(s) for s in u.shape)
    n_state = int(A.shape[1])
    decay = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # (batch, dim, L, N)
    state = (delta * u).unsqueeze(-1) * expand_groups(B, dim).transpose(2, 3)
    chunk = min(CHUNK, 1 << max(0, (length - 1).bit_length()))
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:
        decay = F.pad(decay, (0, 0, 0, pad), value=1.0)
        state = F.pad(state, (0, 0, 0, pad))
    decay = decay.reshape(batch, dim, n_chunks, chunk, n_state)
    state = state.reshape(batch, dim, n_chunks, chunk, n_state)
    # Inclusive scan of h_t = a_t h_{t-1} + x_t inside each chunk (Hillis-Steele doubling).
    step = 1
    while step < chunk:
        state = torch.cat(
            [state[..., :step, :], state[..., step:, :] + decay[..., step:, :] * state[..., :-step, :]], 3
        )
        decay = torch.cat([decay[..., :step, :], decay[..., step:, :] * decay[..., :-step, :]], 3)
        step *= 2
    # Same scan over the chunk ends gives the state entering each chunk.
    carry_decay = decay[..., -1, :]
    carry = state[..., -1, :]
    step = 1
    while step < n_chunks:
        carry = torch.cat(
            [carry[..., :step, :], carry[..., step:, :] + carry_decay[..., step:, :] * carry[..., :-step, :]],
            2,
        )
        carry_decay = torch.cat(
            [carry_decay[..., :step, :], carry_decay[..., step:, :] * carry_decay[..., :-step, :]], 2
        )
        step *= 2
    carry_in = F.pad(carry[..., :-1, :], (0, 0, 1, 0))
    state = state + decay * carry_in.unsqueeze(3)
    state = state.reshape(batch, dim, n_chunks * chunk, n_state)[:, :, :length]
    y = (state * expand_groups(C, dim).transpose(2, 3)).sum(-1)
    return y, state[:, :, -1]


@dataclass(frozen=True, eq=False)
class ScanOrders:
    """The scan orders one call of the fused CPU kernel runs (see :mod:`.cpu_kernel`).

    Attributes:
        positions: ``(S, L)`` int64, the position visited at each step of order ``s``.
        segment: ``(S,)`` int64, order ``s`` restarts from a zero state every ``segment[s]`` steps.
        group_of: ``(S,)`` int64, the parameter group (``delta``, ``A``, ``B``, ``C``, ``D``) of ``s``.
        u_of: ``(S,)`` int64, the input slot ``s`` reads.
        y_of: ``(S,)`` int64, the output slot ``s`` adds into.
        n_outputs: number of output slots.
    """

    positions: np.ndarray
    segment: np.ndarray
    group_of: np.ndarray
    u_of: np.ndarray
    y_of: np.ndarray
    n_outputs: int

    @functools.cached_property
    def max_u(self) -> int:
        """Highest input slot an order reads (checked against the inputs once per call)."""
        return int(self.u_of.max())

    @functools.cached_property
    def max_group(self) -> int:
        """Highest parameter group an order uses."""
        return int(self.group_of.max())

    @functools.cached_property
    def first_writes(self) -> np.ndarray:
        """``(S,)`` bool: order ``s`` is the first to reach its output slot and visits every position once.

        The forward kernel sets each row such an order reaches instead of adding to it, so an output
        slot that has such an order needs no zeroing pass of its own (see :attr:`covers_outputs`).
        """
        everywhere = np.arange(self.positions.shape[1])
        flags = np.zeros(len(self.y_of), dtype=np.bool_)
        seen: set[int] = set()
        for s, slot in enumerate(self.y_of.tolist()):
            if slot not in seen:
                seen.add(slot)
                flags[s] = np.array_equal(np.sort(self.positions[s]), everywhere)
        return flags

    @functools.cached_property
    def covers_outputs(self) -> bool:
        """Whether every output slot is set by a first write, so the output can start uninitialised."""
        return int(self.first_writes.sum()) == self.n_outputs

    @classmethod
    def sequential(cls, length: int, groups: int) -> ScanOrders:
        """Plain Mamba: group ``g`` scans its own input in sequence order into its own output."""
        index = np.arange(groups, dtype=np.int64)
        return cls(
            positions=np.tile(np.arange(length, dtype=np.int64), (groups, 1)),
            segment=np.full(groups, length, dtype=np.int64),
            group_of=index,
            u_of=index,
            y_of=index.copy(),
            n_outputs=groups,
        )


def _numba_forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    delta_bias: Tensor,
    delta_softplus: bool,
    orders: ScanOrders,
    delta_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, bool, tuple[Tensor, ...]]:
    """The fused CPU forward kernel on torch tensors (layouts of :mod:`.cpu_kernel`).

    Returns ``y`` ``(batch, L, Y, Dg)``, the last states ``(batch, S, Dg, N)``, whether every output
    was finite, and the float32 contiguous inputs the backward pass needs (``delta_weight`` last,
    when given).
    """
    from . import cpu_kernel

    set_numba_threads()
    tensors = (u, delta, A, B, C, D, delta_bias) + (() if delta_weight is None else (delta_weight,))
    inputs = tuple(t.detach().float().contiguous() for t in tensors)
    u = inputs[0]
    batch, length, _, dg = u.shape
    new_output = u.new_empty if orders.covers_outputs else u.new_zeros
    y = new_output(batch, length, orders.n_outputs, dg)
    last = u.new_empty(batch, len(orders.segment), dg, inputs[2].shape[1])
    finite = cpu_kernel.scan_forward(
        *(t.numpy() for t in inputs[:7]), delta_softplus, orders.positions, orders.segment, orders.group_of,
        orders.u_of, orders.y_of, orders.first_writes, y.numpy(), last.numpy(),
        delta_weight=None if delta_weight is None else inputs[7].numpy(),
    )  # fmt: skip
    return y, last, finite, inputs


class _NumbaScan(torch.autograd.Function):
    """Autograd wrapper of the fused CPU kernels (float32, layouts of :mod:`.cpu_kernel`).

    Inputs ``u`` ``(batch, L, U, Dg)``, raw ``delta`` ``(G, batch, L, Dg)`` -- or its low-rank form
    ``(batch, L, G, R)`` with ``delta_weight`` ``(G, R, Dg)`` -- ``A`` ``(G, N, Dg)``, ``B``, ``C``
    ``(batch, L, G, N)``, ``D`` and ``delta_bias`` ``(G, Dg)``; returns ``y`` ``(batch, L, Y, Dg)``,
    the last states ``(batch, S, Dg, N)`` and whether ``y`` is finite.
    """

    @staticmethod
    def forward(ctx, *args) -> tuple[Tensor, Tensor, bool]:
        """``args`` as :func:`_numba_forward`."""
        y, last, finite, inputs = _numba_forward(*args)
        ctx.save_for_backward(*inputs)
        ctx.delta_softplus, ctx.orders = args[7], args[8]
        return y, last, finite

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, grad_last: Tensor | None, _grad_finite: None = None):
        from . import cpu_kernel

        set_numba_threads()
        u, delta, A, B, C, D, delta_bias, *low_rank = ctx.saved_tensors
        if low_rank:
            # training: the backward kernel reads the full step sizes, so they are formed here
            # (the memory the inference forward avoids), and the projection's gradients follow
            delta_low, weight = delta, low_rank[0]
            delta = torch.einsum("blgr,grd->gbld", delta_low, weight).contiguous()
        orders: ScanOrders = ctx.orders
        batch, length, _, dg = u.shape
        groups, n_state = A.shape[0], A.shape[1]
        if grad_y is None:
            grad_y = u.new_zeros(batch, length, orders.n_outputs, dg)
        if grad_last is None:
            grad_last = u.new_zeros(batch, len(orders.segment), dg, n_state)
        grad_y, grad_last = grad_y.float().contiguous(), grad_last.float().contiguous()
        blocks = cpu_kernel.blocks_for(batch, dg, n_state)
        grad_u = torch.zeros_like(u)
        grad_delta = torch.zeros_like(delta)
        grad_A = u.new_zeros(batch, groups, n_state, dg)
        grad_B = u.new_zeros(batch, blocks, length, groups, n_state)
        grad_C = u.new_zeros(batch, blocks, length, groups, n_state)
        grad_D = u.new_zeros(batch, groups, dg)
        cpu_kernel.scan_backward(
            u.numpy(), delta.numpy(), A.numpy(), B.numpy(), C.numpy(), D.numpy(), delta_bias.numpy(),
            ctx.delta_softplus, orders.positions, orders.segment, orders.group_of, orders.u_of, orders.y_of,
            grad_y.numpy(), grad_last.numpy(),
            grad_u.numpy(), grad_delta.numpy(), grad_A.numpy(), grad_B.numpy(), grad_C.numpy(), grad_D.numpy(),
        )  # fmt: skip
        grad_bias = grad_delta.sum((1, 2))  # the bias is added at every step of every order
        grad_weight = None
        if low_rank:
            grad_weight = torch.einsum("blgr,gbld->grd", delta_low, grad_delta)
            grad_delta = torch.einsum("gbld,grd->blgr", grad_delta, weight)
        return (
            grad_u,
            grad_delta,
            grad_A.sum(0),
            grad_B.sum(1),
            grad_C.sum(1),
            grad_D.sum(0),
            grad_bias,
            None,
            None,
            grad_weight,
        )


def selective_scan_orders(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    orders: ScanOrders,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    check_finite: bool = True,
    delta_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Run several scan orders over shared channel-last buffers with the fused CPU kernel.

    This is the entry that lets SS2D scan four directions (and the sub-regions of a pyramid)
    without building the flipped / transposed / split copies of the map. Differentiable in all
    tensor inputs; runs on the ``"numba"`` backend only.

    Args:
        u: ``(batch, L, U, Dg)``.
        delta: ``(G, batch, L, Dg)`` step sizes before ``delta_bias`` / softplus.
        A: ``(G, N, Dg)``.
        B, C: ``(batch, L, G, N)``.
        D: ``(G, Dg)`` skip, or ``None``.
        orders: the orders to run.
        delta_bias: ``(G, Dg)`` added to ``delta``, or ``None``.
        delta_softplus: step size ``softplus(delta + delta_bias)``; computed inside the kernel, so
            no biased / soft-plussed copy of ``delta`` is made.
        check_finite: raise on NaN/Inf inputs, or an output that overflowed (callers that checked
            already pass ``False``).
        delta_weight: ``(G, R, Dg)``, or ``None``. When given, ``delta`` is the low-rank form
            ``(batch, L, G, R)`` of the step sizes -- those of group ``g`` at ``(b, l)`` are
            ``delta[b, l, g] @ delta_weight[g]`` (Mamba's ``dt_proj``) -- and the forward kernel
            forms each step's row itself: no ``(G, batch, L, Dg)`` tensor is allocated, which pays
            off for small ``R`` (``R`` FMAs per element against a write and a read of it). The
            backward pass forms it.

    Returns:
        ``y`` ``(batch, L, Y, Dg)`` (float32) and the last states ``(batch, S, Dg, N)``.

    Raises:
        ValueError: inconsistent shapes, or NaN/Inf in an input.
    """
    batch, length, n_u, dg = u.shape
    groups, n_state = A.shape[0], A.shape[1]
    expected = {
        "delta": (groups, batch, length, dg),
        "A": (groups, n_state, dg),
        "B": (batch, length, groups, n_state),
        "C": (batch, length, groups, n_state),
    }
    if delta_bias is not None:
        expected["delta_bias"] = (groups, dg)
    if delta_weight is not None:
        if delta_weight.dim() != 3 or delta_weight.shape[0] != groups or delta_weight.shape[2] != dg:
            raise ValueError(
                f"delta_weight must be (groups={groups}, R, Dg={dg}), got {tuple(delta_weight.shape)}."
            )
        expected["delta"] = (batch, length, groups, delta_weight.shape[1])
    for name, tensor in (("delta", delta), ("A", A), ("B", B), ("C", C), ("delta_bias", delta_bias)):
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name} must be {expected[name]}, got {tuple(tensor.shape)}.")
    if orders.positions.shape[1] != length:
        raise ValueError(f"scan orders cover {orders.positions.shape[1]} positions, the inputs {length}.")
    if orders.max_u >= n_u or orders.max_group >= groups:
        raise ValueError("scan orders name an input slot or group the inputs do not have.")
    from .cpu_kernel import LANES

    D = u.new_zeros(groups, dg) if D is None else D
    delta_bias = u.new_zeros(groups, dg) if delta_bias is None else delta_bias
    pad = -dg % LANES
    if pad:
        # zero channels scan to zero and get zero gradients; autograd slices them off again
        u, A, D, delta_bias = (F.pad(t, (0, pad)) for t in (u, A, D, delta_bias))
        if delta_weight is None:
            delta = F.pad(delta, (0, pad))
        else:
            delta_weight = F.pad(delta_weight, (0, pad))
    args = (u, delta, A, B, C, D, delta_bias, bool(delta_softplus), orders, delta_weight)
    tensors = args[:7] if delta_weight is None else (*args[:7], delta_weight)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        y, last, finite = _NumbaScan.apply(*args)
    else:  # inference: the same kernel without autograd's bookkeeping
        y, last, finite, _ = _numba_forward(*args)
    if check_finite and not finite:
        # A NaN or Inf in any input reaches y (in the step size, the decay or the state), and the
        # kernel sums what it writes, so this costs no pass at all; only now are the inputs tested
        # one by one, to name the culprit. (A raw step size of -inf -- softplus 0, the step keeps the
        # state -- and an A of -inf -- the state restarts -- are limits the scan defines; they pass.)
        _check_finite(u=u, delta=delta, A=A, B=B, C=C, D=D, delta_bias=delta_bias, delta_weight=delta_weight)
        if not bool(torch.isfinite(y).all()):
            raise ValueError(
                "selective_scan: the scan overflowed float32 although its inputs are finite; the step sizes "
                "or A are too large (check the learning rate, loss scale and input normalisation)."
            )
    if pad:
        y, last = y[..., :dg], last[:, :, :dg]
    return y, last


def set_numba_threads() -> None:
    """Size numba's thread pool (the CPU kernels') to torch's intra-op thread count."""
    import numba

    # follow torch's intra-op setting so torch.set_num_threads governs the whole model
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan of Mamba (S6), as mamba-ssm's ``selective_scan_fn``.

    Args:
        u: input ``(batch, dim, L)``.
        delta: step sizes ``(batch, dim, L)`` (before ``delta_bias`` / softplus).
        A: state matrix ``(dim, N)``, real (negative for a stable scan).
        B: input matrix ``(batch, N, L)`` or ``(batch, groups, N, L)``; channel ``d`` uses group
            ``d // (dim // groups)``.
        C: output matrix, same shapes as ``B``.
        D: skip connection ``(dim,)``.
        z: gate ``(batch, dim, L)``; the output is multiplied by ``silu(z)``.
        delta_bias: ``(dim,)`` added to ``delta``.
        delta_softplus: apply softplus to ``delta`` (after the bias).
        return_last_state: also return the state after the last step, ``(batch, dim, N)``.
        backend: ``None``/``"auto"``, ``"mamba_ssm"``, ``"numba"``, ``"torch"`` or ``"reference"``
            (see the module docstring).

    Returns:
        ``y`` of shape ``(batch, dim, L)`` in the dtype of ``u``, and the last state (float32, or
        float64 for float64 inputs) when ``return_last_state``.

    Raises:
        ValueError: inconsistent shapes, an unusable backend, or NaN/Inf inputs on CPU.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u)
    if name == "mamba_ssm":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn(
            u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
            D, None if z is None else z.contiguous(), delta_bias, delta_softplus, return_last_state,
        )  # fmt: skip
    if not _is_exporting():
        _check_finite(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    if name == "reference":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    dtype_in = u.dtype
    compute = torch.float64 if dtype_in == torch.float64 else torch.float32
    u_c, delta_c = u.to(compute), delta.to(compute)
    A_c, B_c, C_c = A.to(compute), B.to(compute), C.to(compute)
    if name == "numba":
        batch, dim, length = u_c.shape
        groups = B_c.shape[1] if B_c.dim() == 4 else 1
        per_group = dim // groups
        y, last = selective_scan_orders(
            u_c.transpose(1, 2).reshape(batch, length, groups, per_group),
            delta_c.reshape(batch, groups, per_group, length).permute(1, 0, 3, 2),
            A_c.reshape(groups, per_group, -1).transpose(1, 2),
            B_c.reshape(batch, groups, -1, length).permute(0, 3, 1, 2),
            C_c.reshape(batch, groups, -1, length).permute(0, 3, 1, 2),
            None if D is None else D.to(compute).reshape(groups, per_group),
            ScanOrders.sequential(length, groups),
            delta_bias=None if delta_bias is None else delta_bias.to(compute).reshape(groups, per_group),
            delta_softplus=delta_softplus,
            check_finite=False,
        )
        y = y.reshape(batch, length, dim).transpose(1, 2)
        last = last.reshape(batch, dim, -1)
    else:
        if delta_bias is not None:
            delta_c = delta_c + delta_bias.to(compute)[:, None]
        if delta_softplus:
            delta_c = F.softplus(delta_c)
        y, last = _scan_torch(u_c, delta_c, A_c, B_c, C_c)
        if D is not None:
            y = y + u_c * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y


def selective_scan_channel_last(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str | None = None,
) -> Tensor:
    """:func:`selective_scan` on channel-last tensors, without copies to the channel-first layout.

    The CPU kernel works channel-last, so callers that already hold their sequences that way (SS2D)
    skip two transposes of every input and one of the output.

    Args:
        u, delta: ``(batch, L, dim)``.
        A: ``(dim, N)``.
        B, C: ``(batch, groups, L, N)``.
        D, delta_bias, delta_softplus, backend: as in :func:`selective_scan`.

    Returns:
        ``y`` of shape ``(batch, L, dim)`` in the dtype of ``u``.
    """
    if u.dim() != 3 or B.dim() != 4 or C.dim() != 4:
        raise ValueError(
            f"channel-last scan needs u (batch, L, dim) and B, C (batch, groups, L, N); got u {tuple(u.shape)}, "
            f"B {tuple(B.shape)}, C {tuple(C.shape)}."
        )
    name = resolve_backend(backend, u)
    if name != "numba":
        y = selective_scan(
            u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(2, 3), C.transpose(2, 3), D,
            delta_bias=delta_bias, delta_softplus=delta_softplus, backend=name,
        )  # fmt: skip
        return y.transpose(1, 2)
    _check_inputs(
        u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(2, 3), C.transpose(2, 3), D, None, delta_bias
    )
    batch, length, dim = u.shape
    groups = B.shape[1]
    per_group = dim // groups
    y, _ = selective_scan_orders(
        u.float().reshape(batch, length, groups, per_group),
        delta.float().reshape(batch, length, groups, per_group).permute(2, 0, 1, 3),
        A.float().reshape(groups, per_group, -1).transpose(1, 2),
        B.float().permute(0, 2, 1, 3),
        C.float().permute(0, 2, 1, 3),
        None if D is None else D.float().reshape(groups, per_group),
        ScanOrders.sequential(length, groups),
        delta_bias=None if delta_bias is None else delta_bias.float().reshape(groups, per_group),
        delta_softplus=delta_softplus,
    )
    return y.reshape(batch, length, dim).to(u.dtype)


__all__ = [
    "BACKENDS",
    "ScanOrders",
    "BACKEND_ENV",
    "Backend",
    "mamba_ssm_available",
    "numba_available",
    "resolve_backend",
    "selective_scan",
    "selective_scan_channel_last",
    "selective_scan_orders",
    "selective_scan_ref",
]
