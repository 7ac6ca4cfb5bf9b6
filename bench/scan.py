"""Selective-scan speed on CPU: fast backends vs a sequential PyTorch loop, same run, medians.

The peer is :func:`memmamba_plugins.ssm.selective_scan_ref`, a straightforward loop over the
sequence in the style of mamba-ssm's ``selective_scan_ref`` (decays and drives precomputed as
tensors, one state update per step), autograd for its backward.

Usage::

    python bench/scan.py                      # batch 2, dim 256, N 16, L 4096, fp32, 2 threads
    python bench/scan.py --length 1024 --repeats 3

The last line prints the forward and forward+backward speed-ups of the default CPU backend.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from memmamba_plugins.ssm import resolve_backend, selective_scan, selective_scan_ref


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_inputs(batch: int, dim: int, n_state: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, dim, length, generator=gen),
        "delta": torch.randn(batch, dim, length, generator=gen) * 0.5 - 2.0,
        "A": -torch.arange(1, n_state + 1, dtype=torch.float32).repeat(dim, 1),  # S4D-real, as Mamba's init
        "B": torch.randn(batch, n_state, length, generator=gen),
        "C": torch.randn(batch, n_state, length, generator=gen),
        "D": torch.ones(dim),
        "delta_bias": torch.rand(dim, generator=gen) * 0.1,
    }


def forward(fn: Callable, inputs: dict[str, torch.Tensor], **kw) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return fn(**inputs, delta_softplus=True, **kw)

    return run


def forward_backward(fn: Callable, inputs: dict[str, torch.Tensor], **kw) -> Callable[[], object]:
    def run() -> object:
        leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
        fn(**leaves, delta_softplus=True, **kw).sum().backward()
        return leaves["u"].grad

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of the fast backends")
    parser.add_argument("--reference-repeats", type=int, default=3, help="timed runs of the sequential loop")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.batch, args.dim, args.state, args.length)
    default = resolve_backend(None, inputs["u"])
    print(
        f"selective scan, batch {args.batch}, dim {args.dim}, N {args.state}, L {args.length}, fp32, "
        f"{args.threads} threads, torch {torch.__version__}; default CPU backend: {default}"
    )

    expected = forward(selective_scan_ref, inputs)()
    rows = []
    print("timing the sequential loop ...", flush=True)
    # the loop has nothing to compile or cache: no warm-up run
    ref_fwd = median_seconds(forward(selective_scan_ref, inputs), args.reference_repeats, warmup=0)
    ref_bwd = median_seconds(forward_backward(selective_scan_ref, inputs), args.reference_repeats, warmup=0)
    rows.append(("sequential loop (peer)", ref_fwd, ref_bwd, 0.0))
    results = {}
    for backend in ("numba", "torch"):
        got = forward(selective_scan, inputs, backend=backend)()
        err = ((got - expected).norm() / expected.norm()).item()
        fwd = median_seconds(forward(selective_scan, inputs, backend=backend), args.repeats)
        bwd = median_seconds(forward_backward(selective_scan, inputs, backend=backend), args.repeats)
        results[backend] = (fwd, bwd)
        rows.append((f"backend={backend}", fwd, bwd, err))

    print(
        f"{'implementation':<24}{'forward (ms)':>14}{'fwd+bwd (ms)':>14}{'fwd x':>8}{'fwd+bwd x':>11}{'rel err':>10}"
    )
    for name, fwd, bwd, err in rows:
        print(
            f"{name:<24}{fwd * 1e3:>14.1f}{bwd * 1e3:>14.1f}{ref_fwd / fwd:>8.1f}{ref_bwd / bwd:>11.1f}{err:>10.1e}"
        )
    fwd, bwd = results[default]
    print(
        f"{default}: forward {ref_fwd / fwd:.1f}x, forward+backward {ref_bwd / bwd:.1f}x faster than the sequential loop"
    )


if __name__ == "__main__":
    main()
