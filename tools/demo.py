#!/usr/bin/env python
"""Short real training on CPU, offline: Pyramid-Mamba through the ``anomalib train`` CLI.

    python tools/demo.py [--data-root DIR] [--synthetic] [--epochs 1] [--size 64] [--out results/demo]

Data: KolektorSDD in MVTec layout from ``../shared/data/ksdd_ad`` when it is there (real grey images
of electrical commutators with defect masks), otherwise -- or with ``--synthetic`` -- a small
generated MVTec-layout dataset of three categories. The model is a reduced Pyramid-Mamba (resnet18
encoder with random weights, since nothing is downloaded; a small pyramid decoder), trained by the
real ``anomalib train`` command with the plugin's short names (``--model PyramidMamba --data MVTec``)
and tested on the test split. anomalib prints its metric table (pooled, per category and the mean
over categories); the checkpoint lands under ``--out``. Exits non-zero when the run fails or the
mean metrics are missing. On two CPU cores: a few minutes, plus ~30 s the first time to compile
the scan kernels (cached afterwards).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KSDD = REPO.parent / "shared" / "data" / "ksdd_ad"
SYNTHETIC_CATEGORIES = ("carpet_like", "grid_like", "metal_like")
#: The reduced model, as anomalib CLI arguments.
MODEL_ARGS = [
    "--model.backbone", "resnet18",
    "--model.pre_trained", "false",
    "--model.decoder_dims", "[64, 32, 16, 8]",
    "--model.decoder_depths", "[1, 2, 1, 1]",
    "--model.css_modules", "[1, 1, 1, 1]",
    "--model.d_state", "8",
    "--model.mff_blocks", "1",
]  # fmt: skip


def anomalib_command() -> str:
    script = Path(sys.executable).with_name("anomalib")
    found = str(script) if script.is_file() else shutil.which("anomalib")
    if found is None:
        sys.exit("The anomalib command is not installed in this environment; run `make setup` first.")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-root", type=Path, default=None, help="an MVTec-layout folder (default: KSDD or generated)"
    )
    parser.add_argument("--categories", default=None, help="e.g. '[ksdd]' (default: every category folder)")
    parser.add_argument(
        "--synthetic", action="store_true", help="use generated data even when KSDD is present"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--size", type=int, default=64, help="square input side, a multiple of 64")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "demo")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = args.data_root
        if root is None and not args.synthetic and (KSDD / "ksdd").is_dir():
            root = KSDD
            print(f"Data: KolektorSDD (MVTec layout) at {root}")
        elif root is None:
            from memmamba_plugins.pyramid_mamba.synthetic import make_synthetic_mvtec

            root = make_synthetic_mvtec(
                Path(scratch) / "mvtec", SYNTHETIC_CATEGORIES, size=args.size, n_train=24, n_test=6
            )
            print(f"Data: generated MVTec-layout dataset ({', '.join(SYNTHETIC_CATEGORIES)}) in {root}")
        categories = (
            args.categories or "[" + ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())) + "]"
        )
        command = [
            anomalib_command(), "train",
            "--model", "PyramidMamba", *MODEL_ARGS, "--model.input_size", str(args.size),
            "--data", "MVTec", "--data.root", str(root), "--data.categories", categories,
            "--data.train_batch_size", str(args.batch_size), "--data.eval_batch_size", str(args.batch_size),
            "--data.num_workers", "0",
            "--trainer.max_epochs", str(args.epochs), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--default_root_dir", str(args.out),
        ]  # fmt: skip
        print("$ " + " ".join(command), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        start = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        output = result.stdout + result.stderr
        tables = [line for line in output.splitlines() if line.startswith(("┃", "│", "┏", "┡", "└", "┌"))]
        print("\n".join(tables) if tables else output[-4000:])
        if result.returncode != 0:
            print(output[-4000:], file=sys.stderr)
            return result.returncode
        if not re.search(r"mean/image_AUROC\s*│", output) or not re.search(r"mean/pixel_AUPRO\s*│", output):
            print("The metric table lacks the mean over categories.", file=sys.stderr)
            return 1
        checkpoints = sorted(args.out.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        print(
            f"Trained {args.epochs} epoch(s) in {time.perf_counter() - start:.0f} s; checkpoint: {checkpoints[-1]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
