"""SS2D: shapes, the region (pyramid) scan, direction symmetry, gradients, initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memmamba_plugins.ssm import SS2D, check_region_size, cpu_kernel, merge_regions, split_regions

#: The kernel itself, for tests that spy on calls to it.
DEPTHWISE = cpu_kernel.depthwise_conv


def make(levels=(0,), d_model: int = 8, **kw) -> SS2D:
    torch.manual_seed(0)
    return SS2D(d_model, d_state=4, pyramid_levels=levels, **kw)


@pytest.mark.parametrize("levels", [(0,), (1,), (0, 1), (0, 1, 2)])
@pytest.mark.parametrize("gated", [True, False])
def test_shapes(levels, gated: bool) -> None:
    module = make(levels, gated=gated, expand=1.5)
    x = torch.randn(2, 8, 8, 8)
    assert module(x).shape == x.shape
    assert module.d_inner == 12


def test_non_square_map_is_fine_without_regions() -> None:
    assert make((0,))(torch.randn(1, 6, 10, 8)).shape == (1, 6, 10, 8)


@pytest.mark.parametrize(("size", "levels"), [((8, 12), (0, 1)), ((6, 6), (0, 1, 2)), ((9, 9), (1,))])
def test_maps_that_do_not_split_raise(size, levels) -> None:
    module = make(levels)
    with pytest.raises(ValueError, match="square map with a side divisible by"):
        module(torch.randn(1, *size, 8))
    with pytest.raises(ValueError, match="fewer pyramid levels"):
        check_region_size(*size, levels)


def test_wrong_channel_count_raises() -> None:
    with pytest.raises(ValueError, match=r"channel-last \(B, H, W, 8\)"):
        make()(torch.randn(1, 8, 4, 4))


@pytest.mark.parametrize("levels", [(), (-1,), (1, 1)])
def test_bad_levels_raise(levels) -> None:
    with pytest.raises(ValueError, match="pyramid_levels"):
        make(levels)


def test_split_merge_roundtrip_and_order() -> None:
    x = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 4, 4, 3)
    regions = split_regions(x, 2)
    assert regions.shape == (8, 2, 2, 3)
    assert torch.equal(regions[1], x[0, :2, 2:])  # second region = top-right quadrant of image 0
    assert torch.equal(regions[4], x[1, :2, :2])
    assert torch.equal(merge_regions(regions, 2), x)


@pytest.mark.parametrize("level", [1, 2])
def test_region_level_equals_scanning_each_region_separately(level: int) -> None:
    module = make((level,)).double()
    x = torch.randn(2, 8, 8, module.d_inner, dtype=torch.float64)
    batched = module.scan2d(x)
    splits, side = 2**level, 8 // 2**level
    for i in range(splits):
        for j in range(splits):
            region = x[:, i * side : (i + 1) * side, j * side : (j + 1) * side]
            alone = module.scan_directions(region).sum(1)
            got = batched[:, i * side : (i + 1) * side, j * side : (j + 1) * side]
            torch.testing.assert_close(got, alone, rtol=1e-10, atol=1e-10)


def test_pyramid_averages_levels_with_shared_weights() -> None:
    module = make((0, 1)).double()
    x = torch.randn(1, 8, 8, module.d_inner, dtype=torch.float64)
    both = module.scan2d(x)
    module.pyramid_levels = (0,)
    whole = module.scan2d(x)
    module.pyramid_levels = (1,)
    quadrants = module.scan2d(x)
    torch.testing.assert_close(both, (whole + quadrants) / 2)
    assert not torch.allclose(whole, quadrants)  # the levels do see different contexts


def test_transposing_the_input_swaps_row_and_column_directions() -> None:
    module = make().double()
    x = torch.randn(2, 5, 7, module.d_inner, dtype=torch.float64)
    swapped = make().double()
    swapped.load_state_dict(module.state_dict())
    order = torch.tensor([1, 0, 3, 2])  # row <-> column, reversed row <-> reversed column
    d = module.d_inner
    with torch.no_grad():
        swapped.x_proj_weight.copy_(module.x_proj_weight[order])
        swapped.dt_projs_weight.copy_(module.dt_projs_weight[order])
        swapped.dt_projs_bias.copy_(module.dt_projs_bias[order])
        swapped.A_logs.copy_(module.A_logs.reshape(4, d, -1)[order].reshape(4 * d, -1))
        swapped.Ds.copy_(module.Ds.reshape(4, d)[order].reshape(-1))
    per_direction = module.scan_directions(x)  # (B, 4, H, W, D)
    transposed = swapped.scan_directions(x.transpose(1, 2))  # (B, 4, W, H, D)
    # the row scan of x^T (with column weights) is the column contribution of x, and so on
    torch.testing.assert_close(transposed[:, order].transpose(2, 3), per_direction, rtol=1e-10, atol=1e-10)
    # and without swapping the weights the directions really differ
    plain = module.scan_directions(x.transpose(1, 2)).transpose(2, 3)
    assert not torch.allclose(plain, per_direction)


@pytest.mark.parametrize("levels", [(0,), (0, 1)])
def test_gradients_reach_every_parameter(levels) -> None:
    module = make(levels)
    module(torch.randn(2, 8, 8, 8)).square().mean().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def assert_same_outputs_and_gradients(fast: SS2D, plain: SS2D, x: torch.Tensor) -> None:
    """``plain`` takes ``fast``'s weights; outputs and every gradient must then agree."""
    plain.load_state_dict(fast.state_dict())
    x_fast, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, y_plain = fast(x_fast), plain(x_plain)
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(y_fast)
    (y_fast * weight).sum().backward()
    (y_plain * weight).sum().backward()
    torch.testing.assert_close(x_fast.grad, x_plain.grad, rtol=1e-4, atol=1e-5)
    for (name, p_fast), p_plain in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p_fast.grad, p_plain.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(("levels", "size"), [((0,), (6, 10)), ((1,), (8, 8)), ((0, 1, 2), (8, 8))])
def test_fused_cross_scan_matches_the_unfused_scans(levels, size) -> None:
    # the numba path runs all directions and regions in one kernel call on the grid order; the torch
    # path builds the flipped / transposed / split sequences -- forward and every gradient must agree
    torch.manual_seed(1)
    fast, plain = make(levels, d_model=10, backend="numba"), make(levels, d_model=10, backend="torch")
    assert_same_outputs_and_gradients(fast, plain, torch.randn(2, *size, 10, dtype=torch.float32))
    inner = torch.randn(1, *size, fast.d_inner)
    with torch.no_grad():
        torch.testing.assert_close(
            fast.scan_directions(inner), plain.scan_directions(inner), rtol=1e-5, atol=1e-5
        )


def test_mamba_initialisation() -> None:
    module = SS2D(32, d_state=16, dt_min=0.002, dt_max=0.05)
    assert module.dt_rank == 2  # ceil(32 / 16)
    dt = F.softplus(module.dt_projs_bias)
    assert dt.min() >= 0.002 * 0.999 and dt.max() <= 0.05 * 1.001
    assert torch.allclose(-torch.exp(module.A_logs[5]), -torch.arange(1, 17, dtype=torch.float32))
    assert torch.all(module.Ds == 1)
    assert module.A_logs._no_weight_decay and module.Ds._no_weight_decay


def test_condition_hook_sits_between_conv_and_scan() -> None:
    class Zeroed(SS2D):
        def condition(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(x)

    torch.manual_seed(0)
    module = Zeroed(8, d_state=4)
    # zero scan input -> scan output 0 -> LayerNorm(0) = its bias (0) -> projection of 0
    out = module(torch.randn(1, 4, 4, 8))
    assert torch.allclose(out, torch.zeros_like(out), atol=1e-6)


@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize("with_bias", [True, False])
def test_depthwise_conv_and_offset_silu_kernels_match_torch(size: int, with_bias: bool) -> None:
    from memmamba_plugins.ssm import cpu_kernel

    channels = 13
    x = torch.randn(2, 7, 9, channels)
    weight = torch.randn(channels, 1, size, size)
    bias = torch.randn(channels) if with_bias else torch.zeros(channels)
    expected = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=size // 2, groups=channels)
    expected = expected.permute(0, 2, 3, 1)
    out = torch.full_like(x, float("nan"))
    sums = cpu_kernel.depthwise_conv(
        x.numpy(), weight[:, 0].permute(1, 2, 0).contiguous().numpy(), bias.numpy(), out.numpy()
    )
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(torch.from_numpy(sums).float(), expected.sum(dim=(1, 2)), atol=1e-3)
    offset = torch.randn(2, channels)
    cpu_kernel.offset_silu(out.numpy(), offset.numpy())
    assert torch.allclose(out, F.silu(expected + offset[:, None, None]), atol=1e-5)


class _Offset(SS2D):
    """An SS2D whose channel offset depends on the pooled map (as MemoryMamba's memories do)."""

    has_channel_offset = True

    def channel_offset(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.tanh(pooled * 3.0) - 0.2


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (SS2D, {}),
        (SS2D, {"gated": True, "conv_bias": True, "d_conv": 5}),
        (SS2D, {"pyramid_levels": (0, 1)}),
        (_Offset, {"gated": False}),
    ],
)
def test_inference_conv_path_matches_the_torch_path(cls, kwargs: dict, monkeypatch) -> None:
    from memmamba_plugins.ssm import cpu_kernel

    torch.manual_seed(0)
    module = cls(16, d_state=1, backend="numba", **kwargs)
    x = torch.randn(2, 8, 8, 16)
    expected = module(x)  # parameters require grad: the torch path
    calls = []
    monkeypatch.setattr(cpu_kernel, "depthwise_conv", lambda *a: calls.append(1) or DEPTHWISE(*a))
    with torch.inference_mode():
        fused = module(x)
    assert calls, "inference did not take the fused conv path"
    assert torch.allclose(fused, expected, atol=1e-5)


def test_a_subclass_overriding_condition_keeps_it_at_inference() -> None:
    class Zeroed(SS2D):
        def condition(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(x)

    torch.manual_seed(0)
    with torch.inference_mode():
        out = Zeroed(8, d_state=4, backend="numba")(torch.randn(1, 4, 4, 8))
    assert torch.allclose(out, torch.zeros_like(out), atol=1e-6)


@pytest.mark.parametrize("width", [32, 64, 128])
def test_kernel_block_widths_give_the_same_scan(width: int, monkeypatch) -> None:
    # the kernel picks its channel-block width from batch, channels and threads; every width must
    # give the torch path's forward and gradients (128 inner channels: 4, 2 or 1 blocks)
    from memmamba_plugins.ssm import cpu_kernel

    monkeypatch.setattr(cpu_kernel, "block_width", lambda *args: width)
    torch.manual_seed(2)
    fast, plain = make((0, 1), d_model=64, backend="numba"), make((0, 1), d_model=64, backend="torch")
    assert_same_outputs_and_gradients(fast, plain, torch.randn(1, 8, 8, 64))


def test_block_width_fills_the_threads_then_widens() -> None:
    from memmamba_plugins.ssm.cpu_kernel import LANES, MAX_BLOCK_STATE, block_width

    assert block_width(1, 192, 1, 2) == 96  # batch 1: one block per thread
    assert block_width(1, 768, 1, 2) == 384
    assert block_width(64, 192, 1, 2) == 192  # a training batch keeps the threads busy anyway
    assert block_width(1, 192, 16, 2) * 16 <= MAX_BLOCK_STATE  # large states stay cache-sized
    assert block_width(1, LANES, 1, 8) == LANES
    with pytest.raises(ValueError, match="multiple of"):
        block_width(1, 40, 1, 2)


def test_non_finite_input_raises_with_the_input_named() -> None:
    module = make((0,), d_model=8, backend="numba")
    x = torch.randn(1, 4, 4, 8)
    x[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="'u' contains NaN or Inf"):
        module(x)


def test_overflow_inside_the_scan_raises() -> None:
    from memmamba_plugins.ssm.selective_scan import selective_scan_orders
    from memmamba_plugins.ssm.ss2d import cross_scan_orders

    u = torch.full((1, 16, 1, 32), 3e38)  # finite, but y = D * u summed over four directions is not
    delta = torch.zeros(4, 1, 16, 32)
    A = -torch.ones(4, 1, 32)
    B = C = torch.ones(1, 16, 4, 1)
    with pytest.raises(ValueError, match="overflowed float32"):
        selective_scan_orders(u, delta, A, B, C, torch.ones(4, 32), cross_scan_orders(4, 4, (0,), False))


@pytest.mark.parametrize("name", ["u", "delta", "A", "B", "C", "D", "delta_bias"])
def test_every_non_finite_scan_input_is_named(name: str) -> None:
    # selective_scan_orders checks its inputs through its output; each input must still be caught
    from memmamba_plugins.ssm.selective_scan import selective_scan_orders
    from memmamba_plugins.ssm.ss2d import cross_scan_orders

    torch.manual_seed(0)
    inputs = {
        "u": torch.randn(1, 16, 1, 32),
        "delta": torch.randn(4, 1, 16, 32),
        "A": -torch.rand(4, 2, 32) - 0.1,
        "B": torch.randn(1, 16, 4, 2),
        "C": torch.randn(1, 16, 4, 2),
        "D": torch.randn(4, 32),
        "delta_bias": torch.randn(4, 32),
    }
    inputs[name].view(-1)[5] = float("nan")
    bias = inputs.pop("delta_bias")
    with pytest.raises(ValueError, match=f"'{name}' contains NaN or Inf"):
        selective_scan_orders(
            **inputs, orders=cross_scan_orders(4, 4, (0,), False), delta_bias=bias, delta_softplus=True
        )


@pytest.mark.parametrize("d_state", [1, 4])
@pytest.mark.parametrize("in_kernel_rank", [0, 16])
def test_step_size_projection_in_or_out_of_the_kernel(d_state: int, in_kernel_rank: int, monkeypatch) -> None:
    # at inference, ranks up to MAX_IN_KERNEL_DT_RANK are projected inside the kernel; larger ones,
    # and training, use a batched matmul. d_state 1 takes the kernel's one-pass step. Each path must
    # give the torch path's forward (with and without autograd) and gradients.
    from memmamba_plugins.ssm import ss2d

    monkeypatch.setattr(ss2d, "MAX_IN_KERNEL_DT_RANK", in_kernel_rank)
    torch.manual_seed(3)
    fast = SS2D(40, d_state=d_state, pyramid_levels=(0, 1), gated=False, backend="numba")
    plain = SS2D(40, d_state=d_state, pyramid_levels=(0, 1), gated=False, backend="torch")
    assert fast.dt_rank == 3
    x = torch.randn(2, 8, 8, 40)
    assert_same_outputs_and_gradients(fast, plain, x)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_state", [1, 3])
def test_low_rank_step_sizes_equal_the_full_tensor(n_state: int) -> None:
    # delta_weight: the kernel forms delta[g, b, l] = low[b, l, g] @ weight[g] itself; the result and
    # every gradient (the low-rank factors' included) must equal passing the full tensor. 40
    # channels per group also exercises the padding to the kernel's lane multiple.
    from memmamba_plugins.ssm.selective_scan import selective_scan_orders
    from memmamba_plugins.ssm.ss2d import cross_scan_orders

    torch.manual_seed(4)
    groups, batch, length, dg, rank = 4, 2, 16, 40, 5
    leaves = {
        "u": torch.randn(batch, length, 1, dg),
        "low": torch.randn(batch, length, groups, rank),
        "weight": torch.randn(groups, rank, dg) * 0.3,
        "A": -torch.rand(groups, n_state, dg) - 0.1,
        "B": torch.randn(batch, length, groups, n_state),
        "C": torch.randn(batch, length, groups, n_state),
        "D": torch.randn(groups, dg),
        "bias": torch.randn(groups, dg),
    }
    orders = cross_scan_orders(4, 4, (0, 1), False)

    def run(low_rank: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        if low_rank:
            delta, weight = t["low"], t["weight"]
        else:
            delta, weight = torch.einsum("blgr,grd->gbld", t["low"], t["weight"]), None
        y, last = selective_scan_orders(
            t["u"], delta, t["A"], t["B"], t["C"], t["D"], orders,
            delta_bias=t["bias"], delta_softplus=True, delta_weight=weight,
        )  # fmt: skip
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().add(last.square().sum()).backward()
        return y.detach(), {k: v.grad for k, v in t.items()}

    y_low, grads_low = run(True)
    y_full, grads_full = run(False)
    torch.testing.assert_close(y_low, y_full, rtol=1e-5, atol=1e-5)
    for name in leaves:
        torch.testing.assert_close(grads_low[name], grads_full[name], rtol=1e-4, atol=1e-5, msg=name)


def test_low_rank_weight_of_the_wrong_shape_raises() -> None:
    from memmamba_plugins.ssm.selective_scan import selective_scan_orders
    from memmamba_plugins.ssm.ss2d import cross_scan_orders

    with pytest.raises(ValueError, match="delta_weight must be"):
        selective_scan_orders(
            torch.randn(1, 16, 1, 32), torch.randn(1, 16, 4, 3), -torch.rand(4, 1, 32),
            torch.randn(1, 16, 4, 1), torch.randn(1, 16, 4, 1), None, cross_scan_orders(4, 4, (0,), False),
            delta_weight=torch.randn(4, 32, 3),
        )  # fmt: skip
