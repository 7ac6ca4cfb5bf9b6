"""KolektorSDD: Pyramid-Mamba vs anomalib's ReverseDistillation, same encoder initialisation, same epochs.

Data: ``shared/data/ksdd_ad`` (KolektorSDD in MVTec layout, grey), read in place through anomalib's
own ``MVTecAD`` datamodule. Both models use a ``resnet34`` encoder with IDENTICAL frozen weights
(random init from one seed, or ``--weights`` = a local timm/torchvision resnet34 checkpoint: no
ImageNet weights are reachable offline) and train for the same number of epochs with their default
optimisers. Prints image AUROC, pixel AUPRO and pixel AP (AUPR) per model as a Markdown table.

    python bench/pyramid_mamba_ksdd.py --epochs 1 --size 128
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

KSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "ksdd_ad"
COLUMNS = ("image_AUROC", "pixel_AUPRO", "pixel_AUPR")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=KSDD)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--size", type=int, default=128, help="square input side (multiple of 64)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--weights", type=Path, default=None, help="local resnet34 checkpoint for both encoders"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (args.root / "ksdd").is_dir():
        raise SystemExit(f"KolektorSDD not found under {args.root}; nothing to benchmark.")
    torch.set_num_threads(args.threads)

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.metrics import AUPR, AUPRO, AUROC, Evaluator
    from anomalib.models import ReverseDistillation

    from memmamba_plugins.pyramid_mamba import PyramidMamba

    def evaluator() -> Evaluator:
        return Evaluator(
            test_metrics=[
                AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
                AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
                AUPR(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            ]
        )

    size = (args.size, args.size)
    torch.manual_seed(42)
    pm = PyramidMamba(
        pre_trained=False,
        weights_path=str(args.weights) if args.weights else None,
        input_size=size,
        evaluator=evaluator(),
        visualizer=False,
    )
    rd = ReverseDistillation(
        backbone="resnet34",
        pre_trained=False,
        pre_processor=PyramidMamba.configure_pre_processor(size),
        evaluator=evaluator(),
        visualizer=False,
    )
    # Same frozen encoder weights for both models (both are timm resnet34 features_only networks).
    rd.model.encoder.feature_extractor.load_state_dict(pm.model.encoder.state_dict())

    rows = []
    for name, model in (("PyramidMamba", pm), ("ReverseDistillation", rd)):
        datamodule = MVTecAD(
            root=args.root,
            category="ksdd",
            train_batch_size=args.batch,
            eval_batch_size=args.batch,
            num_workers=0,
        )
        with tempfile.TemporaryDirectory() as tmp:
            engine = Engine(
                max_epochs=args.epochs,
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_progress_bar=False,
                default_root_dir=tmp,
                num_sanity_val_steps=0,
            )
            start = time.perf_counter()
            engine.fit(model, datamodule=datamodule)
            train_s = time.perf_counter() - start
            results = engine.test(model, datamodule=datamodule)[0]
        rows.append((name, *(results[c] for c in COLUMNS), train_s))
        print(name, {c: round(float(results[c]), 4) for c in COLUMNS}, f"train {train_s:.0f} s", flush=True)

    init = f"weights {args.weights.name}" if args.weights else "random init (seed 42)"
    print(f"\nKolektorSDD, {args.size}x{args.size}, {args.epochs} epoch(s), resnet34 encoder: {init}\n")
    print("| model | image AUROC | pixel AUPRO | pixel AP | train time (s) |")
    print("| --- | --- | --- | --- | --- |")
    for name, auroc, aupro, ap, seconds in rows:
        print(f"| {name} | {auroc:.3f} | {aupro:.3f} | {ap:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
