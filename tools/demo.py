#!/usr/bin/env python
"""Short CPU training demo: an SS2D denoiser on generated smooth images.

    python tools/demo.py [--steps 60] [--batch-size 8] [--width 16] [--seed 0] [--threads 1]

Each step draws a fresh batch of smooth random 16x16 images with 8 channels (bilinear upsampling of
4x4 noise), adds Gaussian noise, and trains Linear -> SS2D residual block (two-level pyramid scan)
-> Linear to recover the clean images (MSE). The loss on a fixed held-out batch is printed before and after training; the
script exits with status 1 if it did not go down. Needs no data and no network. On two CPU cores it
takes about 15 s, plus about 30 s the first time to compile the numba scan kernels (cached after).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memmamba_plugins.ssm import SS2D

SIZE = 16
CHANNELS = 8
NOISE_STD = 0.5


def smooth_images(batch: int, generator: torch.Generator) -> Tensor:
    """Random smooth images ``(B, SIZE, SIZE, CHANNELS)``, channel-last, roughly unit variance."""
    coarse = torch.randn(batch, CHANNELS, 4, 4, generator=generator)
    images = F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=True)
    return images.permute(0, 2, 3, 1).contiguous()


def noisy_pair(batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    clean = smooth_images(batch, generator)
    return clean + NOISE_STD * torch.randn(clean.shape, generator=generator), clean


class Denoiser(nn.Module):
    """Linear in -> ``x + SS2D(LayerNorm(x))`` -> LayerNorm -> Linear out, channel-last."""

    def __init__(
        self, channels: int = CHANNELS, width: int = 16, pyramid_levels: tuple[int, ...] = (0, 1)
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(channels, width)
        self.norm = nn.LayerNorm(width)
        self.mixer = SS2D(d_model=width, d_state=8, expand=2.0, pyramid_levels=pyramid_levels)
        self.out_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        h = h + self.mixer(self.norm(h))
        return self.head(self.out_norm(h))


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=16, help="channels inside the model")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch and numba (the model is tiny: 1 is fastest)",
    )
    args = parser.parse_args(argv)

    set_threads(args.threads)

    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed)
    eval_noisy, eval_clean = noisy_pair(64, torch.Generator().manual_seed(args.seed + 1))

    model = Denoiser(width=args.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"SS2D denoiser ({n_params / 1e3:.1f} k parameters) on {SIZE}x{SIZE}x{CHANNELS} smooth images, "
        f"noise std {NOISE_STD}, {args.steps} steps of batch {args.batch_size}"
    )

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = F.mse_loss(model(eval_noisy), eval_clean).item()
        model.train()
        return loss

    print("(the first run compiles the numba CPU scan kernels, about 30 s; later runs use the cache)")
    start = time.perf_counter()
    initial = eval_loss()
    print(f"held-out loss before training: {initial:.4f} (noisy input itself: {NOISE_STD**2:.4f})")
    for step in range(1, args.steps + 1):
        noisy, clean = noisy_pair(args.batch_size, data)
        loss = F.mse_loss(model(noisy), clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps:
            print(f"step {step:4d}  train loss {loss.item():.4f}  ({time.perf_counter() - start:.1f} s)")
    final = eval_loss()
    print(f"held-out loss {initial:.4f} -> {final:.4f} in {time.perf_counter() - start:.1f} s")
    if not final < initial:
        print("FAILED: the held-out loss did not go down.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
