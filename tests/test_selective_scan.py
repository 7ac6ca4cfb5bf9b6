"""Exactness of the selective-scan backends against the float64 sequential reference."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

from memmamba_plugins.ssm import BACKEND_ENV, resolve_backend, selective_scan, selective_scan_ref
from memmamba_plugins.ssm.selective_scan import mamba_ssm_available

FAST_BACKENDS = ("numba", "torch")
OUT_TOL = 1e-5
GRAD_TOL = 1e-4
# Fresh inputs on every run; the seed is printed so a failure can be replayed.
RUN_SEED = int(os.environ.get("MEMMAMBA_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    return diff / scale if scale > 0 else diff


def make_inputs(
    L: int, groups: int, *, use_D: bool, use_z: bool, use_bias: bool, softplus: bool, batch: int = 2, dim: int = 8,
    n_state: int = 16, seed: int = 0,
) -> dict[str, torch.Tensor | None]:  # fmt: skip
    gen = torch.Generator().manual_seed(RUN_SEED + seed)
    f64 = dict(dtype=torch.float64, generator=gen)
    if softplus:
        delta = torch.randn(batch, dim, L, **f64) * 0.5 - 1.0
    else:
        delta = torch.rand(batch, dim, L, **f64) * 0.2 + 1e-3
    return {
        "u": torch.randn(batch, dim, L, **f64),
        "delta": delta,
        "A": -torch.exp(torch.randn(dim, n_state, **f64)),
        "B": torch.randn(batch, groups, n_state, L, **f64)
        if groups > 1
        else torch.randn(batch, n_state, L, **f64),
        "C": torch.randn(batch, groups, n_state, L, **f64)
        if groups > 1
        else torch.randn(batch, n_state, L, **f64),
        "D": torch.randn(dim, **f64) if use_D else None,
        "z": torch.randn(batch, dim, L, **f64) if use_z else None,
        # without softplus the biased step must stay positive, else the scan grows without bound
        "delta_bias": (torch.randn(dim, **f64) * 0.3 if softplus else torch.rand(dim, **f64) * 0.05)
        if use_bias
        else None,
    }


def run_scan(fn, inputs, softplus: bool, **kw):
    names = [k for k, v in inputs.items() if v is not None]
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in names}
    args = {k: leaves.get(k) for k in inputs}
    y, last = fn(**args, delta_softplus=softplus, return_last_state=True, **kw)
    gen = torch.Generator().manual_seed(RUN_SEED + 99)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    gl = torch.randn(last.shape, dtype=torch.float64, generator=gen)
    loss = (y.double() * gy).sum() + (last.double() * gl).sum()
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return y, last, dict(zip(names, grads))


_REFERENCE_CACHE: dict[tuple, tuple] = {}


def reference_result(inputs, softplus: bool, key: tuple):
    """float64 reference, computed once per input set and shared by the backends."""
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = run_scan(selective_scan_ref, inputs, softplus)
    return _REFERENCE_CACHE[key]


def check_against_reference(backend: str, inputs, softplus: bool, key: tuple) -> None:
    y_ref, last_ref, g_ref = reference_result(inputs, softplus, key)
    inputs32 = {k: (v.float() if v is not None else None) for k, v in inputs.items()}
    y, last, g = run_scan(selective_scan, inputs32, softplus, backend=backend)
    assert y.dtype == torch.float32
    context = f"backend={backend} seed={RUN_SEED}"
    assert rel_err(y, y_ref) <= OUT_TOL, f"output {rel_err(y, y_ref):.2e} ({context})"
    assert rel_err(last, last_ref) <= OUT_TOL, f"last state {rel_err(last, last_ref):.2e} ({context})"
    for name, grad in g.items():
        err = rel_err(grad, g_ref[name])
        assert err <= GRAD_TOL, f"grad of {name}: {err:.2e} ({context})"


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("L", [1, 7, 64, 257, 4096])
@pytest.mark.parametrize("all_options", [True, False], ids=["all-options", "bare"])
def test_matches_reference_across_lengths(backend: str, groups: int, L: int, all_options: bool) -> None:
    inputs = make_inputs(
        L, groups, use_D=all_options, use_z=all_options, use_bias=all_options, softplus=all_options, seed=L
    )
    check_against_reference(backend, inputs, all_options, key=("lengths", L, groups, all_options))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(
    ("use_D", "use_z", "use_bias", "softplus"), list(itertools.product([False, True], repeat=4))
)
def test_matches_reference_every_option(
    backend: str, use_D: bool, use_z: bool, use_bias: bool, softplus: bool
) -> None:
    inputs = make_inputs(
        64, 2, use_D=use_D, use_z=use_z, use_bias=use_bias, softplus=softplus, dim=20, seed=7
    )
    check_against_reference(backend, inputs, softplus, key=("options", use_D, use_z, use_bias, softplus))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_without_last_state_returns_tensor(backend: str) -> None:
    inputs = make_inputs(33, 1, use_D=True, use_z=False, use_bias=True, softplus=True)
    inputs32 = {k: (v.float() if v is not None else None) for k, v in inputs.items()}
    y = selective_scan(**inputs32, delta_softplus=True, backend=backend)
    assert isinstance(y, torch.Tensor) and y.shape == inputs["u"].shape
    y_ref = selective_scan_ref(**inputs, delta_softplus=True)
    assert rel_err(y, y_ref) <= OUT_TOL


def test_reference_is_the_plain_recurrence() -> None:
    """Guard the oracle itself with a hand-written scalar recurrence."""
    inputs = make_inputs(
        9, 1, use_D=True, use_z=True, use_bias=True, softplus=True, batch=1, dim=2, n_state=3
    )
    y = selective_scan_ref(**inputs, delta_softplus=True)
    u, A, B, C, D, z = (inputs[k] for k in ("u", "A", "B", "C", "D", "z"))
    dt = torch.nn.functional.softplus(inputs["delta"] + inputs["delta_bias"][:, None])
    for d in range(2):
        h = torch.zeros(3, dtype=torch.float64)
        for t in range(9):
            h = torch.exp(dt[0, d, t] * A[d]) * h + dt[0, d, t] * B[0, :, t] * u[0, d, t]
            out = (h * C[0, :, t]).sum() + D[d] * u[0, d, t]
            out = out * z[0, d, t] * torch.sigmoid(z[0, d, t])
            assert torch.allclose(y[0, d, t], out, rtol=1e-12, atol=1e-12)


def test_float64_auto_is_exact() -> None:
    inputs = make_inputs(100, 2, use_D=True, use_z=True, use_bias=True, softplus=True)
    assert resolve_backend(None, inputs["u"]) == "torch"
    y = selective_scan(**inputs, delta_softplus=True)
    assert y.dtype == torch.float64
    assert rel_err(y, selective_scan_ref(**inputs, delta_softplus=True)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_half_precision_inputs(dtype: torch.dtype, backend: str) -> None:
    inputs = make_inputs(50, 1, use_D=True, use_z=True, use_bias=True, softplus=True)
    low = {k: (v.to(dtype) if v is not None else None) for k, v in inputs.items()}
    y = selective_scan(**low, delta_softplus=True, backend=backend)
    assert y.dtype == dtype
    exact = selective_scan_ref(
        **{k: (v.double() if v is not None else None) for k, v in low.items()}, delta_softplus=True
    )
    assert rel_err(y, exact) < 1e-2


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("name", ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_raise(backend: str, name: str, bad: float) -> None:
    inputs = make_inputs(16, 1, use_D=True, use_z=True, use_bias=True, softplus=True)
    inputs = {k: (v.float() if v is not None else None) for k, v in inputs.items()}
    inputs[name].view(-1)[3] = bad
    with pytest.raises(ValueError, match=f"'{name}' contains NaN or Inf"):
        selective_scan(**inputs, delta_softplus=True, backend=backend)


def test_large_finite_values_are_not_mistaken_for_nan() -> None:
    inputs = make_inputs(16, 1, use_D=False, use_z=False, use_bias=False, softplus=False)
    inputs = {k: (v.float() if v is not None else None) for k, v in inputs.items()}
    inputs["u"].fill_(3e38)  # the sum overflows; the exact check must clear it
    selective_scan(**inputs, backend="torch")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda i: i.update(u=i["u"][0]), "u must be"),
        (lambda i: i.update(delta=i["delta"][:, :, :-1]), "delta must"),
        (lambda i: i.update(A=i["A"][:-1]), "A must be"),
        (lambda i: i.update(B=i["B"][:, :-1]), "B must be"),
        (lambda i: i.update(C=i["C"].reshape(2, 3, 16, -1)), "C must be"),
        (lambda i: i.update(D=i["u"][0, 0]), "D must be"),
    ],
)
def test_bad_shapes_raise(change, message: str) -> None:
    inputs = make_inputs(12, 1, use_D=True, use_z=False, use_bias=False, softplus=False, dim=6)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs)


def test_backend_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    u32 = torch.zeros(1, 2, 3)
    assert resolve_backend(None, u32) == "numba"
    assert resolve_backend("torch", u32) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert resolve_backend(None, u32) == "reference"
    assert resolve_backend("numba", u32) == "numba"  # an explicit argument beats the environment
    monkeypatch.setenv(BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match="Unknown selective-scan backend"):
        resolve_backend(None, u32)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("mamba_ssm", u32)
    with pytest.raises(ValueError, match="use backend='torch'"):
        resolve_backend("numba", u32.double())


class _ScanModule(torch.nn.Module):
    def __init__(self, dim: int, n_state: int) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(-torch.exp(torch.randn(dim, n_state)))
        self.D = torch.nn.Parameter(torch.randn(dim))

    def forward(self, u, delta, B, C):
        return selective_scan(u, delta, self.A, B, C, self.D, delta_softplus=True)


def test_tracing_uses_the_pure_torch_path() -> None:
    torch.manual_seed(0)
    module = _ScanModule(6, 4)
    args = (torch.randn(2, 6, 70), torch.randn(2, 6, 70), torch.randn(2, 4, 70), torch.randn(2, 4, 70))
    traced = torch.jit.trace(module, args, check_trace=False)
    graph = str(traced.graph)
    assert "PythonOp" not in graph, "the numba autograd Function leaked into the traced graph"
    new_args = tuple(torch.randn_like(a) for a in args)
    assert rel_err(traced(*new_args), module(*new_args)) < 1e-6


def test_onnx_export_matches_eager(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    module = _ScanModule(6, 4).eval()
    args = (torch.randn(1, 6, 50), torch.randn(1, 6, 50), torch.randn(1, 4, 50), torch.randn(1, 4, 50))
    path = tmp_path / "scan.onnx"
    torch.onnx.export(module, args, str(path), input_names=["u", "delta", "B", "C"], dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_y,) = session.run(None, {n: a.numpy() for n, a in zip(["u", "delta", "B", "C"], args)})
    assert np.abs(onnx_y - module(*args).detach().numpy()).max() < 1e-4


def test_fast_exp_accuracy() -> None:
    from memmamba_plugins.ssm.cpu_kernel import elementwise_float32

    x = np.linspace(-87.0, 88.0, 200_001, dtype=np.float32)
    approx = elementwise_float32(x, "exp").astype(np.float64)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(approx - exact) / exact) < 5e-7  # a few float32 ulp


def test_kernel_softplus_and_sigmoid_match_torch() -> None:
    from memmamba_plugins.ssm.cpu_kernel import elementwise_float32

    x = np.concatenate(
        [np.linspace(-80.0, 80.0, 100_001, dtype=np.float32), np.float32([20.0, 20.001, 19.999, np.nan])]
    )
    fast = elementwise_float32(x, "softplus").astype(np.float64)
    exact = torch.nn.functional.softplus(torch.from_numpy(x).double()).numpy()
    finite = np.isfinite(exact)
    assert np.isnan(fast[-1])  # NaN propagates, so the scan's finiteness check still sees it
    assert np.max(np.abs(fast - exact)[finite] / exact[finite]) < 5e-7
    slope = elementwise_float32(x[finite], "sigmoid").astype(np.float64)
    expected = torch.sigmoid(torch.from_numpy(x[finite]).double()).numpy()
    assert np.max(np.abs(slope - expected) / expected) < 1e-6


@pytest.mark.skipif(
    not (torch.cuda.is_available() and mamba_ssm_available()), reason="needs CUDA and mamba-ssm"
)
def test_mamba_ssm_kernel_matches_cpu() -> None:
    inputs = make_inputs(1024, 2, use_D=True, use_z=True, use_bias=True, softplus=True, dim=64)
    cpu = {k: (v.float() if v is not None else None) for k, v in inputs.items()}
    gpu = {k: (v.cuda() if v is not None else None) for k, v in cpu.items()}
    y_gpu = selective_scan(**gpu, delta_softplus=True, backend="mamba_ssm").cpu()
    y_cpu = selective_scan(**cpu, delta_softplus=True, backend="numba")
    assert rel_err(y_gpu, y_cpu) <= 1e-3


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_channel_last_entry_matches(backend: str) -> None:
    from memmamba_plugins.ssm import selective_scan_channel_last

    inputs = make_inputs(40, 2, use_D=True, use_z=False, use_bias=True, softplus=True, dim=18)
    x = {k: (v.float().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y = selective_scan(**x, delta_softplus=True, backend="reference")
    y_cl = selective_scan_channel_last(
        x["u"].transpose(1, 2), x["delta"].transpose(1, 2), x["A"], x["B"].transpose(2, 3), x["C"].transpose(2, 3),
        x["D"], x["delta_bias"], delta_softplus=True, backend=backend,
    )  # fmt: skip
    assert rel_err(y_cl.transpose(1, 2), y) <= OUT_TOL
    names = ["u", "delta", "A", "B", "C", "D", "delta_bias"]
    g_ref = torch.autograd.grad(y.square().sum(), [x[n] for n in names])
    g_cl = torch.autograd.grad(y_cl.square().sum(), [x[n] for n in names])
    for name, a, b in zip(names, g_cl, g_ref):
        assert rel_err(a, b) <= GRAD_TOL, name


def test_scan_orders_segments_restart_the_state() -> None:
    from memmamba_plugins.ssm import ScanOrders, selective_scan_orders

    inputs = make_inputs(40, 1, use_D=True, use_z=False, use_bias=False, softplus=False, dim=16)
    u, delta, A, B, C, D = (inputs[k].float() for k in ("u", "delta", "A", "B", "C", "D"))
    base = ScanOrders.sequential(40, 1)
    halves = ScanOrders(base.positions, base.segment // 2, base.group_of, base.u_of, base.y_of, 1)
    y, _ = selective_scan_orders(
        u.transpose(1, 2)[:, :, None], delta.transpose(1, 2)[None], A.t()[None], B.transpose(1, 2)[:, :, None],
        C.transpose(1, 2)[:, :, None], D[None], halves,
    )  # fmt: skip
    parts = [
        selective_scan(u[..., s], delta[..., s], A, B[..., s], C[..., s], D, backend="reference")
        for s in (slice(0, 20), slice(20, 40))
    ]
    assert rel_err(y[:, :, 0].transpose(1, 2), torch.cat(parts, dim=-1)) <= OUT_TOL
    with pytest.raises(ValueError, match="delta must be"):
        selective_scan_orders(u.transpose(1, 2)[:, :, None], delta[None], A.t()[None], B, C, None, halves)


def test_scan_orders_set_or_add_their_outputs() -> None:
    """Slot 0: a full reverse order (sets its rows) then a forward one (adds); slot 1: an order that
    visits half the positions twice (adds into zeros); slot 2: no order at all (stays zero)."""
    from memmamba_plugins.ssm import ScanOrders, cpu_kernel, selective_scan_orders

    length = 40
    inputs = make_inputs(
        length, 1, use_D=True, use_z=False, use_bias=False, softplus=False, dim=32, n_state=2
    )
    u, delta, A, B, C, D = (inputs[k].float() for k in ("u", "delta", "A", "B", "C", "D"))
    forward = np.arange(length)
    twice_half = np.concatenate([np.arange(length // 2)] * 2)
    orders = ScanOrders(
        positions=np.stack([forward[::-1], forward, twice_half]).copy(),
        segment=np.full(3, length),
        group_of=np.zeros(3, dtype=np.int64),
        u_of=np.zeros(3, dtype=np.int64),
        y_of=np.array([0, 0, 1]),
        n_outputs=3,
    )
    assert orders.first_writes.tolist() == [True, False, False] and not orders.covers_outputs

    def along(positions: np.ndarray) -> torch.Tensor:
        index = torch.from_numpy(positions.copy())
        out = selective_scan(
            u[..., index], delta[..., index], A, B[..., index], C[..., index], D, backend="reference"
        )
        return torch.zeros_like(u).index_add_(2, index, out)

    expected = [along(forward[::-1]) + along(forward), along(twice_half), torch.zeros_like(u)]
    args = (
        u.transpose(1, 2)[:, :, None], delta.transpose(1, 2)[None], A.t()[None], B.transpose(1, 2)[:, :, None],
        C.transpose(1, 2)[:, :, None], D[None],
    )  # fmt: skip
    y, _ = selective_scan_orders(*args, orders)
    for slot in range(3):
        assert rel_err(y[:, :, slot].transpose(1, 2), expected[slot]) <= OUT_TOL, slot

    # at the kernel itself: rows an order sets may hold anything before (here NaN)
    y_nan = np.full(tuple(y.shape), np.nan, dtype=np.float32)
    y_nan[:, :, 1:] = 0.0
    last = np.zeros((2, 3, 32, 2), dtype=np.float32)
    arrays = [t.detach().contiguous().numpy() for t in args] + [np.zeros((1, 32), dtype=np.float32)]
    cpu_kernel.scan_forward(
        *arrays, False, orders.positions, orders.segment, orders.group_of, orders.u_of, orders.y_of,
        orders.first_writes, y_nan, last,
    )  # fmt: skip
    assert np.array_equal(y_nan, y.numpy())
