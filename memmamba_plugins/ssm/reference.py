"""Sequential reference of the selective scan: the oracle the fast paths are tested against.

The recurrence is the discretised selective SSM of Mamba (Gu & Dao, "Mamba: Linear-Time
Sequence Modeling with Selective State Spaces", 2023, Alg. 2, zero-order hold for ``A`` and
Euler step for ``B``)::

    dt_t  = softplus(delta_t + delta_bias)            (softplus optional)
    h_t   = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
    y_t   = <C_t, h_t> + D * u_t
    out_t = y_t * silu(z_t)                           (gate optional)

This module is deliberately slow and plain: one Python step per sequence element, computed in
the dtype of the inputs (pass float64 tensors to get a float64 oracle).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def expand_groups(mat: Tensor, dim: int) -> Tensor:
    """Broadcast input-dependent ``B`` or ``C`` to one matrix per channel.

    Args:
        mat: ``(batch, N, L)`` or ``(batch, groups, N, L)``. Channel ``d`` uses group
            ``d // (dim // groups)``, as in mamba-ssm.
        dim: number of channels ``D`` of ``u``.

    Returns:
        ``(batch, dim, N, L)`` view-or-copy of ``mat``.
    """
    if mat.dim() == 3:
        return mat.unsqueeze(1).expand(mat.shape[0], dim, mat.shape[1], mat.shape[2])
    groups = mat.shape[1]
    return mat.repeat_interleave(dim // groups, dim=1)


def selective_scan_ref(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan, one sequence step at a time (readable reference).

    Same signature, shapes and semantics as :func:`memmamba_plugins.ssm.selective_scan`.
    """
    batch, dim, _ = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B_full = expand_groups(B, dim)
    C_full = expand_groups(C, dim)
    decay = torch.exp(delta.unsqueeze(-1) * A[None, :, None, :])  # (batch, dim, L, N)
    drive = (delta * u).unsqueeze(-1) * B_full.transpose(2, 3)  # (batch, dim, L, N)
    state = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    # unbind, not indexing: indexing's backward would allocate a full-size gradient per step
    for decay_t, drive_t, c_t in zip(decay.unbind(2), drive.unbind(2), C_full.unbind(3)):
        state = decay_t * state + drive_t
        ys.append((state * c_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return (y, state) if return_last_state else y
