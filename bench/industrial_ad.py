"""Multi-class Pyramid-Mamba against anomalib's best models on real industrial data, same ImageNet encoder.

Data: ``shared/data/industrial_ad`` -- three real categories (``ksdd``, ``ball_screw``, ``pcb``) in one
MVTec-layout root. ``--max-train`` / ``--max-test`` draw the same fixed random subset (seed 0) for every
model, so a run fits a CPU session; the full sets are the default.

Models, every one on the SAME frozen encoder weights (timm ``tf_efficientnet_lite0``, ImageNet, installed
offline by the ``lite0`` extra) and the same pre-processing (resize to ``--size``, [-1, 1] normalisation):

* ``pm``: Pyramid-Mamba, ONE model over all categories (the paper's multi-class protocol), metrics per
  category from that one model; evaluated after each of ``--pm-epochs`` (a time-to-accuracy curve of
  one run, constant learning rate);
* ``pm_single``: Pyramid-Mamba trained per category, ``--pm-single-epochs`` each;
* ``patchcore``, ``padim``, ``stfpm``: anomalib's models trained per category, as anomalib users run them
  (PatchCore and Padim need one pass; STFPM trains its student for ``--stfpm-epochs``).

anomalib's ReverseDistillation cannot take this encoder (its decoder is defined for ResNets only) and no
ResNet ImageNet weights are reachable offline, so it is not in this table; ``bench/pyramid_mamba_latency.py``
compares speed with it.

Peers get the weights through timm's own loading: the converted checkpoint is written into a temporary
Hugging Face hub cache (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``) that ``timm.create_model(..., pretrained=True)``
reads; the script checks that every model's encoder holds exactly Pyramid-Mamba's encoder weights.

    python bench/industrial_ad.py --size 128 --max-train 200 --max-test 100 --pm-epochs 1,2,4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# huggingface_hub reads these when it is imported: set them before any import of timm.
_HUB_CACHE = tempfile.mkdtemp(prefix="industrial_ad_hub_")
os.environ["HF_HUB_CACHE"] = _HUB_CACHE
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "industrial_ad"
BACKBONE = "tf_efficientnet_lite0"
#: lite0 features at reductions 4 / 8 / 16 (24 / 40 / 112 channels), the analogues of ResNet layer1-3.
PM_LAYERS = ("blocks.1", "blocks.2", "blocks.4")
#: PatchCore's default uses the stride-8 and stride-16 maps (ResNet layer2 / layer3).
PATCHCORE_LAYERS = ("blocks.2", "blocks.4")
PADIM_FEATURES = 100
METRICS = ("image_AUROC", "image_AUPR", "pixel_AUROC", "pixel_AUPRO")
SUBSET_SEED = 0


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def _pick(files: list[Path], limit: int | None, rng: random.Random) -> list[Path]:
    files = sorted(files)
    if limit is None or len(files) <= limit:
        return files
    return sorted(rng.sample(files, limit))


def _place(src: Path, dst: Path) -> None:
    """Hard link (anomalib refuses symbolic links that leave the root), or copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def make_subset(root: Path, categories: list[str], max_train: int | None, max_test: int | None, out: Path) -> Path:
    """An MVTec-layout tree of links to the originals: at most ``max_train`` training and ``max_test`` test
    images per label and category, drawn with a fixed seed; masks follow their images."""
    rng = random.Random(SUBSET_SEED)
    for category in categories:
        src = root / category
        for split, limit in (("train", max_train), ("test", max_test)):
            for label_dir in sorted(p for p in (src / split).iterdir() if p.is_dir()):
                chosen = _pick([p for p in label_dir.iterdir() if p.is_file()], limit, rng)
                target = out / category / split / label_dir.name
                target.mkdir(parents=True, exist_ok=True)
                for image in chosen:
                    _place(image, target / image.name)
                    if split == "test" and label_dir.name != "good":
                        mask = src / "ground_truth" / label_dir.name / f"{image.stem}_mask.png"
                        masks = out / category / "ground_truth" / label_dir.name
                        masks.mkdir(parents=True, exist_ok=True)
                        _place(mask, masks / mask.name)
    return out


def count_images(root: Path, category: str) -> dict[str, int]:
    return {
        split: sum(1 for p in (root / category / split).rglob("*") if p.is_file()) for split in ("train", "test")
    }


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def evaluator():
    from anomalib.metrics import Evaluator

    return Evaluator(test_metrics=test_metrics())


def test_metrics() -> list:
    from anomalib.metrics import AUPR, AUPRO, AUROC

    return [
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        AUPR(fields=["pred_score", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=0.3),
    ]


def pre_processor(size: int):
    from memmamba_plugins.pyramid_mamba import PyramidMamba

    return PyramidMamba.configure_pre_processor((size, size), backbone=BACKBONE)


def build_pm(args: argparse.Namespace, per_category: bool):
    from memmamba_plugins.pyramid_mamba import PyramidMamba
    from memmamba_plugins.pyramid_mamba.evaluator import MultiClassEvaluator

    return PyramidMamba(
        backbone=BACKBONE,
        layers=PM_LAYERS,
        pre_trained=True,
        input_size=args.size,
        optimizer=args.pm_optimizer,
        lr=args.pm_lr,
        lr_decay_at=None,
        loss_type=args.pm_loss,
        evaluator=MultiClassEvaluator(test_metrics=test_metrics(), per_category=per_category),
        visualizer=False,
    )


def build_peer(name: str, size: int):
    from anomalib.models import Padim, Patchcore, Stfpm

    common = {"pre_processor": pre_processor(size), "evaluator": evaluator(), "visualizer": False}
    if name == "patchcore":
        return Patchcore(backbone=BACKBONE, layers=PATCHCORE_LAYERS, pre_trained=True, **common)
    if name == "padim":
        return Padim(backbone=BACKBONE, layers=list(PM_LAYERS), pre_trained=True, n_features=PADIM_FEATURES, **common)
    if name == "stfpm":
        return Stfpm(backbone=BACKBONE, layers=PM_LAYERS, **common)
    raise ValueError(name)


def frozen_encoder(name: str, model) -> torch.nn.Module:
    if name.startswith("pm"):
        return model.model.encoder
    if name == "stfpm":
        return model.model.teacher_model.feature_extractor
    return model.model.feature_extractor.feature_extractor


def check_same_weights(reference: dict[str, torch.Tensor], encoder: torch.nn.Module, name: str) -> None:
    """Every tensor the encoder shares with Pyramid-Mamba's encoder is identical (same ImageNet weights)."""
    state = encoder.state_dict()
    shared = [k for k in state if k in reference]
    if len(shared) < len(state) // 2 or any(not torch.equal(state[k], reference[k]) for k in shared):
        raise SystemExit(f"{name}: its encoder does not hold the same ImageNet weights as Pyramid-Mamba's.")


def latency(model, size: int, repeats: int) -> float:
    """Median seconds of one eval forward of the torch model (batch 1, anomaly map included)."""
    net = model.model.eval()
    image = torch.randn(1, 3, size, size)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            net(image)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------
def engine(max_epochs: int, root_dir: str, validate: bool):
    """anomalib's Engine; ``validate`` runs anomalib's validation once, after the last epoch.

    anomalib's metrics (torchmetrics) read scores outside [0, 1] as logits and squash them with a
    sigmoid; scores of hundreds (PatchCore, Padim) then all become 1.0 and every AUROC 0.5 unless the
    post-processor has normalised them with the min / max it collects during validation (anomalib's
    default validates on the test set). Pyramid-Mamba's scores are cosine distances (0..2), where the
    sigmoid is strictly monotonic, so its threshold-free metrics are exact without that pass.
    """
    from anomalib.engine import Engine

    val = {"check_val_every_n_epoch": max_epochs} if validate else {"limit_val_batches": 0}
    return Engine(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=root_dir,
        num_sanity_val_steps=0,
        **val,
    )


def run_pm_multiclass(args, root: Path, categories: list[str], reference) -> None:
    """One model over all categories, tested after each epoch count of ``--pm-epochs``."""
    from memmamba_plugins.pyramid_mamba import MVTec

    model = build_pm(args, per_category=True)
    check_same_weights(reference, frozen_encoder("pm", model), "pm")
    datamodule = MVTec(
        root=root, categories=categories, train_batch_size=args.batch, eval_batch_size=args.batch, num_workers=0
    )
    train_s, done, checkpoint = 0.0, 0, None
    with tempfile.TemporaryDirectory() as tmp:
        for epochs in args.pm_epochs:
            eng = engine(epochs, tmp, validate=False)
            start = time.perf_counter()
            eng.fit(model, datamodule=datamodule, ckpt_path=checkpoint)
            train_s += time.perf_counter() - start
            checkpoint = str(Path(tmp) / f"epoch{epochs}.ckpt")
            eng.trainer.save_checkpoint(checkpoint)
            results = eng.test(model, datamodule=datamodule, verbose=False)[0]
            done = epochs
            for category in categories:
                record("pm", category, epochs, {m: results[f"{category}/{m}"] for m in METRICS}, train_s)
            print(f"pm after {done} epoch(s): mean", {m: round(results[f"mean/{m}"], 4) for m in METRICS},
                  f"train {train_s:.0f} s", flush=True)  # fmt: skip
    record_latency("pm", latency(model, args.size, args.latency_repeats))


def run_per_category(name: str, args, root: Path, categories: list[str], reference) -> None:
    from anomalib.data import MVTecAD

    epochs = {"pm_single": args.pm_single_epochs, "stfpm": args.stfpm_epochs}.get(name, 1)
    train_s, model = 0.0, None
    for category in categories:
        model = build_pm(args, per_category=False) if name == "pm_single" else build_peer(name, args.size)
        check_same_weights(reference, frozen_encoder(name, model), name)
        datamodule = MVTecAD(
            root=root, category=category, train_batch_size=args.batch, eval_batch_size=args.batch, num_workers=0
        )
        with tempfile.TemporaryDirectory() as tmp:
            eng = engine(epochs, tmp, validate=name != "pm_single")
            start = time.perf_counter()
            eng.fit(model, datamodule=datamodule)
            seconds = time.perf_counter() - start
            train_s += seconds
            results = eng.test(model, datamodule=datamodule, verbose=False)[0]
        record(name, category, epochs, {m: results[m] for m in METRICS}, seconds)
        print(name, category, {m: round(results[m], 4) for m in METRICS}, f"train {seconds:.0f} s", flush=True)
    record_latency(name, latency(model, args.size, args.latency_repeats))


RESULTS: dict = {"rows": [], "latency_s": {}}


def record(model: str, category: str, epochs: int, metrics: dict, train_s: float) -> None:
    RESULTS["rows"].append(
        {"model": model, "category": category, "epochs": epochs, "train_s": train_s, **{k: float(v) for k, v in metrics.items()}}
    )


def record_latency(model: str, seconds: float) -> None:
    RESULTS["latency_s"][model] = seconds


def table(categories: list[str]) -> str:
    """Markdown: per model (and PM epoch count) the per-category and mean metrics."""
    lines = ["| model | epochs | " + " | ".join(f"{c} I-AUROC/P-AUPRO" for c in categories)
             + " | mean I-AUROC | mean I-AP | mean P-AUROC | mean P-AUPRO | train s | latency s/img |",
             "|" + " --- |" * (len(categories) + 8)]  # fmt: skip
    keys = []
    for row in RESULTS["rows"]:
        if (row["model"], row["epochs"]) not in keys:
            keys.append((row["model"], row["epochs"]))
    for model, epochs in keys:
        rows = {r["category"]: r for r in RESULTS["rows"] if r["model"] == model and r["epochs"] == epochs}
        cells = [f"{rows[c]['image_AUROC']:.3f} / {rows[c]['pixel_AUPRO']:.3f}" for c in categories]
        means = [statistics.mean(rows[c][m] for c in categories) for m in METRICS]
        train = max(r["train_s"] for r in rows.values()) if model == "pm" else sum(r["train_s"] for r in rows.values())
        lat = RESULTS["latency_s"].get(model)
        lat_cell = "-" if lat is None else f"{lat:.3f}"
        lines.append(
            f"| {model} | {epochs} | " + " | ".join(cells) + " | " + " | ".join(f"{v:.3f}" for v in means)
            + f" | {train:.0f} | {lat_cell} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DATA)
    parser.add_argument("--categories", default="ksdd,ball_screw,pcb")
    parser.add_argument("--size", type=int, default=256, help="square input side (multiple of 64)")
    parser.add_argument("--max-train", type=int, default=None, help="training images per category (default all)")
    parser.add_argument("--max-test", type=int, default=None, help="test images per label and category")
    parser.add_argument("--models", default="pm,pm_single,patchcore,padim,stfpm")
    parser.add_argument("--pm-epochs", default="1,2,4", help="epoch counts at which multi-class PM is tested")
    parser.add_argument("--pm-single-epochs", type=int, default=4)
    parser.add_argument("--pm-optimizer", default="adam", choices=("adam", "adamw"))
    parser.add_argument("--pm-lr", type=float, default=None)
    parser.add_argument("--pm-loss", default="mse", choices=("mse", "cosine"))
    parser.add_argument("--stfpm-epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = parser.parse_args()
    args.pm_epochs = sorted(int(e) for e in args.pm_epochs.split(","))
    categories = [c.strip() for c in args.categories.split(",")]
    if not all((args.root / c).is_dir() for c in categories):
        print(f"Categories {categories} not all found under {args.root}; nothing to benchmark.", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)

    from lightning.pytorch import seed_everything

    from memmamba_plugins import pretrained

    pretrained.install_hub_cache(BACKBONE, _HUB_CACHE)
    seed_everything(args.seed, workers=True)
    reference = frozen_encoder("pm", build_pm(args, per_category=False)).state_dict()

    with tempfile.TemporaryDirectory() as scratch:
        root = args.root
        if args.max_train is not None or args.max_test is not None:
            root = make_subset(args.root, categories, args.max_train, args.max_test, Path(scratch) / "subset")
        RESULTS["data"] = {c: count_images(root, c) for c in categories}
        RESULTS["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        print("images per category:", RESULTS["data"], flush=True)
        for name in [m.strip() for m in args.models.split(",")]:
            seed_everything(args.seed, workers=True)
            if name == "pm":
                run_pm_multiclass(args, root, categories, reference)
            else:
                run_per_category(name, args, root, categories, reference)
            if args.json:
                args.json.write_text(json.dumps(RESULTS, indent=1))

    print(f"\nindustrial_ad, {args.size}x{args.size}, encoder {BACKBONE} (ImageNet), data {RESULTS['data']}\n")
    print(table(categories))
    return 0


if __name__ == "__main__":
    sys.exit(main())
