#!/usr/bin/env python
"""README's main job: multi-class Pyramid-Mamba on real industrial images, CPU, offline, through ``anomalib train``.

    python tools/demo.py [--data-root DIR] [--synthetic] [--size 128] [--max-steps 150] [--out results/demo]

Data: ``../shared/data/industrial_ad`` when it is there -- three real inspection categories in one
MVTec-layout root (KolektorSDD commutators, BSData ball-screw drives, DeepPCB boards) -- else, or with
``--synthetic``, a generated MVTec-layout dataset of three textures with planted scratches and spots.

Model: Pyramid-Mamba with the paper's decoder and a frozen ImageNet ``tf_efficientnet_lite0`` encoder,
whose weights come from the ``lite0`` extra (nothing is downloaded). ONE model is trained on the normal
images of all categories (the paper's multi-class protocol) by the real ``anomalib train`` command with
the plugin's short names (``--model PyramidMamba --data MVTec``), then tested on every test image.
Lightning's progress bar shows the training; at the end the script prints the per-category and mean
metrics (from the CSV log) and the folder of heat-map images written by anomalib's visualizer. It exits
non-zero when the run fails or the metrics are missing.

Budget: ``--max-steps`` optimiser steps of ``--batch-size`` images at ``--size`` (default 150 x 8 images at
128x128, about 6 minutes of training on two CPU cores, plus about 3 minutes of testing) -- a fraction of an
epoch of the paper's schedule. See docs/pyramid_mamba.md for what longer training gives.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INDUSTRIAL_AD = REPO.parent / "shared" / "data" / "industrial_ad"
SYNTHETIC_CATEGORIES = ("stripes_like", "checker_like", "grain_like")
BACKBONE = "tf_efficientnet_lite0"
#: lite0 features at strides 4 / 8 / 16, the analogues of ResNet layer1-3.
LAYERS = "[blocks.1, blocks.2, blocks.4]"
#: Metrics shown at the end, as logged by the model's evaluator.
SHOWN = ("image_AUROC", "image_AUPR", "pixel_AUROC", "pixel_AUPRO")


def anomalib_command() -> str:
    script = Path(sys.executable).with_name("anomalib")
    found = str(script) if script.is_file() else shutil.which("anomalib")
    if found is None:
        sys.exit("The anomalib command is not installed in this environment; run `make setup` first.")
    return found


def read_test_metrics(log_dir: Path) -> dict[str, float]:
    """The last logged value of every metric in Lightning's CSV log."""
    values: dict[str, float] = {}
    for path in sorted(log_dir.rglob("metrics.csv")):
        with path.open() as handle:
            for row in csv.DictReader(handle):
                values.update({k: float(v) for k, v in row.items() if v not in ("", None) and k not in ("epoch", "step")})
    return values


def print_table(metrics: dict[str, float], categories: list[str]) -> None:
    header = f"{'category':<14}" + "".join(f"{m:>14}" for m in SHOWN)
    print(header)
    print("-" * len(header))
    for category in [*categories, "mean"]:
        cells = "".join(f"{metrics.get(f'{category}/{m}', float('nan')):>14.3f}" for m in SHOWN)
        print(f"{category:<14}{cells}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None, help="an MVTec-layout folder (default: industrial_ad)")
    parser.add_argument("--categories", default=None, help="e.g. '[ksdd, pcb]' (default: every category folder)")
    parser.add_argument("--synthetic", action="store_true", help="use generated data even when real data is there")
    parser.add_argument("--size", type=int, default=128, help="square input side, a multiple of 64")
    parser.add_argument("--max-steps", type=int, default=150, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "demo")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = args.data_root
        if root is None and not args.synthetic and INDUSTRIAL_AD.is_dir():
            root = INDUSTRIAL_AD
            print(f"Data: real industrial images (MVTec layout) at {root}")
        elif root is None:
            from memmamba_plugins.pyramid_mamba.synthetic import make_synthetic_mvtec

            root = make_synthetic_mvtec(
                Path(scratch) / "generated", SYNTHETIC_CATEGORIES, size=args.size, n_train=64, n_test=16
            )
            print(f"Data: generated textures with planted defects ({', '.join(SYNTHETIC_CATEGORIES)}) in {root}")
        categories = (
            [c.strip() for c in args.categories.strip("[]").split(",")]
            if args.categories
            else sorted(p.name for p in root.iterdir() if p.is_dir())
        )
        run_dir = args.out / time.strftime("%Y%m%d-%H%M%S")
        command = [
            anomalib_command(), "train",
            "--model", "PyramidMamba", "--model.backbone", BACKBONE, "--model.layers", LAYERS,
            "--model.pre_trained", "true", "--model.input_size", str(args.size),
            "--model.lr_decay_at", "null",
            "--data", "MVTec", "--data.root", str(root), "--data.categories", "[" + ", ".join(categories) + "]",
            "--data.train_batch_size", str(args.batch_size), "--data.eval_batch_size", str(args.batch_size),
            "--data.num_workers", "0",
            "--trainer.max_steps", str(args.max_steps), "--trainer.max_epochs", "-1",
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(run_dir / "logs"), "--trainer.logger.name", "demo",
            "--default_root_dir", str(run_dir),
        ]  # fmt: skip
        print("$ " + " ".join(command), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        start = time.perf_counter()
        result = subprocess.run(command, env=env)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            print(f"anomalib train failed (exit {result.returncode}); see its output above.", file=sys.stderr)
            return result.returncode

    metrics = read_test_metrics(run_dir / "logs")
    missing = [f"{c}/{m}" for c in [*categories, "mean"] for m in SHOWN if f"{c}/{m}" not in metrics]
    if missing:
        print(f"The test metrics lack {missing}.", file=sys.stderr)
        return 1
    images = sorted(run_dir.rglob("images"))
    checkpoints = sorted(run_dir.rglob("*.ckpt"))
    print(f"\nPyramid-Mamba, ONE model for {len(categories)} categories, {args.size}x{args.size}, "
          f"{args.max_steps} steps of {args.batch_size} images ({seconds:.0f} s for training and testing):\n")  # fmt: skip
    print_table(metrics, categories)
    print(
        "\nimage_AUROC: how well the image score separates defective from normal images (0.5 = chance, 1 = "
        "perfect); image_AUPR: the same as average precision; pixel_AUROC / pixel_AUPRO: how well the heat "
        "map marks the defective pixels (AUPRO: per-defect overlap up to 30 % false-positive rate)."
    )
    if images:
        print(f"Heat maps (image | ground truth | anomaly map per test image): {images[0]}")
    if checkpoints:
        print(f"Checkpoint: {checkpoints[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
