"""NEU-CLS from scratch: MemoryMamba vs mmpretrain's ResNet-18 vs MemoryMamba with memories off.

    .venv/bin/python bench/memory_mamba_neu.py [--data ../shared/data/neu_cls] [--arch tiny]
        [--size 64] [--epochs 4] [--train-per-class 0] [--batch 32] [--lr 1e-3]

Identical budget and pipeline for every model: the same images (grey, loaded once, resized to
``--size``, replicated to 3 channels, ImageNet-normalised), the same random horizontal flips,
AdamW with the same lr and a linear decay, the same epochs and batch, the same seed (``--seed``,
default 0) for weights, data order and flips. The paper's lr 2e-5 is a fine-tuning rate for
pretrained weights; from scratch a larger rate is needed and is shared by all models. Metrics are
ACC and macro F1 on the full val split (the paper's ACC / F1). Skips cleanly (exit 0) when the
data folder is absent.

The default ``--arch tiny`` is the paper-size model; on a 2-core CPU use e.g.
``--arch '{"depths": [1, 1, 2, 1], "embed_dim": 32}' --size 48 --epochs 15``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample

import memmamba_plugins.memory_mamba  # noqa: F401  (registers MemoryMamba)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "neu_cls"
IMAGENET_MEAN, IMAGENET_STD = 0.449, 0.226  # grey: mean of the RGB statistics
DEFAULT_SEED = 0


def load_split(
    folder: Path, classes: list[str], size: int, per_class: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted((folder / name).glob("*"))
        if per_class:
            files = files[:per_class]
        for path in files:
            img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            images.append(cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA))
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).float().div_(255).sub_(IMAGENET_MEAN).div_(IMAGENET_STD)
    return x[:, None].expand(-1, 3, -1, -1).contiguous(), torch.tensor(labels)


def model_cfgs(arch: str | dict, num_classes: int) -> dict[str, dict]:
    width = 8 * (
        arch["embed_dim"] if isinstance(arch, dict) else {"tiny": 96, "small": 96, "base": 128}[arch]
    )
    memory = dict(
        type="MemoryMambaClassifier",
        backbone=dict(type="MemoryMamba", arch=arch, drop_path_rate=0.1),
        neck=dict(type="GlobalAveragePooling"),
        head=dict(
            type="MemoryMambaClsHead",
            num_classes=num_classes,
            in_channels=width,
            coarse_loss=dict(type="MemoryContrastiveLoss", margin=0.5, loss_weight=0.1),
            fine_loss=dict(type="MemoryInfoNCELoss", temperature=0.5, loss_weight=0.05),
        ),
    )
    off = json.loads(json.dumps(memory))
    off["backbone"].update(coarse_slots=0, fine_slots=0)
    resnet = dict(
        type="ImageClassifier",
        backbone=dict(type="ResNet", depth=18),
        neck=dict(type="GlobalAveragePooling"),
        head=dict(type="LinearClsHead", num_classes=num_classes, in_channels=512),
    )
    return {"memorymamba": memory, "memorymamba_memory_off": off, "resnet18": resnet}


def macro_f1(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    scores = []
    for k in range(num_classes):
        tp = ((pred == k) & (target == k)).sum().item()
        fp = ((pred == k) & (target != k)).sum().item()
        fn = ((pred != k) & (target == k)).sum().item()
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def run(name: str, cfg: dict, data: dict, args: argparse.Namespace, num_classes: int) -> dict:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = MODELS.build(cfg)
    x_train, y_train = data["train"]
    steps_per_epoch = (len(y_train) + args.batch - 1) // args.batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LinearLR(
        optimizer, 1.0, 0.01, total_iters=args.epochs * steps_per_epoch
    )
    generator = torch.Generator().manual_seed(args.seed)  # same order and flips for every model
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        flips = torch.rand(len(y_train), generator=generator) < 0.5
        for i in range(steps_per_epoch):
            idx = order[i * args.batch : (i + 1) * args.batch]
            x = x_train[idx].clone()
            x[flips[idx]] = x[flips[idx]].flip(-1)
            samples = [DataSample().set_gt_label(int(k)) for k in y_train[idx]]
            losses = model(x, samples, mode="loss")
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(
            f"  {name} epoch {epoch + 1}: " + " ".join(f"{k} {v.item():.3f}" for k, v in losses.items()),
            flush=True,
        )
    train_s = time.perf_counter() - start
    model.eval()
    x_val, y_val = data["val"]
    with torch.inference_mode():
        logits = torch.cat([model(x_val[i : i + 64], mode="tensor") for i in range(0, len(y_val), 64)])
    pred = F.softmax(logits, -1).argmax(-1)
    return dict(
        acc=(pred == y_val).float().mean().item(),
        f1=macro_f1(pred, y_val, num_classes),
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        train_s=train_s,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--arch", default="tiny", help="preset name or a JSON dict with depths / embed_dim")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-per-class", type=int, default=0, help="0 = all training images")
    parser.add_argument("--models", default="memorymamba,memorymamba_memory_off,resnet18")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="weights, data order and flips")
    args = parser.parse_args()
    if not (args.data / "train").is_dir() or not (args.data / "val").is_dir():
        print(f"NEU-CLS not found under {args.data} (expected train/ and val/ class folders); skipping.")
        return 0
    arch = json.loads(args.arch) if args.arch.strip().startswith("{") else args.arch
    classes = sorted(p.name for p in (args.data / "train").iterdir() if p.is_dir())
    data = {
        "train": load_split(args.data / "train", classes, args.size, args.train_per_class),
        "val": load_split(args.data / "val", classes, args.size),
    }
    print(
        f"NEU-CLS {len(classes)} classes, train {len(data['train'][1])}, val {len(data['val'][1])}, "
        f"{args.size}px, {args.epochs} epochs, batch {args.batch}, AdamW lr {args.lr}, arch {arch}",
        flush=True,
    )
    cfgs = model_cfgs(arch, len(classes))
    results = {}
    for name in args.models.split(","):
        results[name] = run(name, cfgs[name], data, args, len(classes))
        r = results[name]
        print(
            f"{name}: ACC {r['acc']:.4f} macro-F1 {r['f1']:.4f} ({r['params_m']:.2f} M params, {r['train_s']:.0f} s)",
            flush=True,
        )
    print("| model | ACC | macro F1 | params (M) | train time (s) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['acc']:.4f} | {r['f1']:.4f} | {r['params_m']:.2f} | {r['train_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
