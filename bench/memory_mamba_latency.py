"""CPU inference latency: MemoryMamba-tiny vs mmpretrain's ResNet-50, same run, 224x224, batch 1.

MemoryMamba-tiny with its memories off is timed too, to separate the memories' cost from SS2D's.

    .venv/bin/python bench/memory_mamba_latency.py [--repeats 10] [--warmup 3] [--threads N]

Both are full classifiers built through mmpretrain's registry (backbone + global pooling + head),
in eval mode under ``torch.inference_mode``. Runs alternate between the models so that load from
other processes hits all alike. Prints per-model medians and minima, and the page faults per
forward (fresh memory that the C allocator maps in; it varies between processes and moves the
timings of both models, see docs/memory_mamba.md); the last line is the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

try:
    import resource
except ImportError:  # Windows: no page-fault counter
    resource = None

import torch
from mmpretrain.registry import MODELS

import memmamba_plugins.memory_mamba  # noqa: F401  (registers MemoryMamba)

#: Input side and batch of the measurement (the issue's setting).
IMAGE_SIZE = 224
BATCH = 1
NUM_CLASSES = 10

MODEL_CFGS: dict[str, dict] = {
    "memorymamba_tiny": dict(
        type="MemoryMambaClassifier",
        backbone=dict(type="MemoryMamba", arch="tiny"),
        neck=dict(type="GlobalAveragePooling"),
        head=dict(type="MemoryMambaClsHead", num_classes=NUM_CLASSES, in_channels=768),
    ),
    "memorymamba_tiny_memory_off": dict(
        type="MemoryMambaClassifier",
        backbone=dict(type="MemoryMamba", arch="tiny", coarse_slots=0, fine_slots=0),
        neck=dict(type="GlobalAveragePooling"),
        head=dict(type="MemoryMambaClsHead", num_classes=NUM_CLASSES, in_channels=768),
    ),
    "resnet50": dict(
        type="ImageClassifier",
        backbone=dict(type="ResNet", depth=50),
        neck=dict(type="GlobalAveragePooling"),
        head=dict(type="LinearClsHead", num_classes=NUM_CLASSES, in_channels=2048),
    ),
}


def _page_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not count them)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {name: MODELS.build(cfg).eval() for name, cfg in MODEL_CFGS.items()}
    x = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    times: dict[str, list[float]] = {name: [] for name in models}
    faults = dict.fromkeys(models, 0)
    with torch.inference_mode():
        for _ in range(args.warmup):  # JIT compilation of the scan kernel, allocator warm-up
            for model in models.values():
                model(x, mode="tensor")
        for _ in range(args.repeats):
            for name, model in models.items():
                faults_before = _page_faults()
                start = time.perf_counter()
                model(x, mode="tensor")
                times[name].append(time.perf_counter() - start)
                faults[name] += _page_faults() - faults_before
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {IMAGE_SIZE}x{IMAGE_SIZE}, batch {BATCH}"
    )
    for name, median in medians.items():
        params = sum(p.numel() for p in models[name].parameters()) / 1e6
        print(
            f"{name}: median {median * 1e3:.1f} ms (min {min(times[name]) * 1e3:.1f}), {params:.1f} M params, "
            f"{faults[name] / args.repeats:.0f} page faults per forward"
        )
    ratio = medians["memorymamba_tiny"] / medians["resnet50"]
    print(f"ratio memorymamba_tiny / resnet50: {ratio:.2f}x")


if __name__ == "__main__":
    main()
