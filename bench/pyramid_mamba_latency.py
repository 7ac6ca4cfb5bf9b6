"""CPU latency of Pyramid-Mamba (paper size) vs anomalib's ReverseDistillation with the SAME encoder
(resnet34) and with its default encoder (wide_resnet50_2).

All models are timed in the same process, interleaved (PM, RD-r34, RD-wrn50, PM, ...) so that load
from other processes hits them alike; medians are reported. Inference: 256x256, batch 1, eval mode,
the torch model's full output (anomaly map incl. up-sampling and blur, score). Training: one
optimiser step (forward, backward, Adam step) at batch ``--train-batch``.

    python bench/pyramid_mamba_latency.py [--repeats 7] [--threads 2]

The last lines give the ratios PM / RD-resnet34 and PM / RD-wide_resnet50_2. The encoders start from random weights (no
download); weights do not change the cost.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

INPUT_SIZE = (256, 256)
#: ReverseDistillation with Pyramid-Mamba's encoder (resnet34) and with anomalib's default encoder.
RD_BACKBONES = ("resnet34", "wide_resnet50_2")
WARMUP = 2


def build_models() -> dict[str, torch.nn.Module]:
    """The paper-size Pyramid-Mamba and anomalib's ReverseDistillation torch models."""
    from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode
    from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel

    from memmamba_plugins.pyramid_mamba import PyramidMambaModel

    models: dict[str, torch.nn.Module] = {"PyramidMamba": PyramidMambaModel(pre_trained=False, input_size=INPUT_SIZE)}
    for backbone in RD_BACKBONES:
        models[f"RD-{backbone}"] = ReverseDistillationModel(
            backbone=backbone,
            input_size=INPUT_SIZE,
            layers=["layer1", "layer2", "layer3"],
            pre_trained=False,
            anomaly_map_mode=AnomalyMapGenerationMode.ADD,  # anomalib's default
        )
    return models


def infer_step(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], object]:
    model.eval()

    def step() -> object:
        with torch.inference_mode():
            return model(images)

    return step


def train_step(name: str, model: torch.nn.Module, images: torch.Tensor) -> Callable[[], object]:
    """One optimisation step with each model's own loss."""
    from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss

    from memmamba_plugins.pyramid_mamba.loss import PyramidMambaLoss

    loss_fn = PyramidMambaLoss() if name == "PyramidMamba" else ReverseDistillationLoss()  # RD-*
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=5e-4)

    def step() -> object:
        model.train()
        if hasattr(model, "encoder"):
            model.encoder.eval()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(*model(images))
        loss.backward()
        optimizer.step()
        return loss

    return step


def interleaved_medians(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for step in steps.values():
        for _ in range(WARMUP):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CI machine: 2 cores)")
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = build_models()
    for name, model in models.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{name}: {trainable / 1e6:.1f} M trainable parameters")

    images = torch.randn(1, 3, *INPUT_SIZE)
    infer = interleaved_medians({n: infer_step(m, images) for n, m in models.items()}, args.repeats)
    for name, seconds in infer.items():
        print(
            f"inference {name}: {seconds:.3f} s/img (median of {args.repeats}, batch 1, {args.threads} threads)"
        )
    if not args.skip_train:
        batch = torch.randn(args.train_batch, 3, *INPUT_SIZE)
        train = interleaved_medians(
            {n: train_step(n, m, batch) for n, m in models.items()}, max(3, args.repeats // 2)
        )
        for name, seconds in train.items():
            print(f"train step {name}: {seconds:.3f} s (batch {args.train_batch})")
        for backbone in RD_BACKBONES:
            print(f"ratio PM/RD-{backbone} train step: {train['PyramidMamba'] / train[f'RD-{backbone}']:.2f}")
    for backbone in RD_BACKBONES:
        print(f"ratio PM/RD-{backbone} inference: {infer['PyramidMamba'] / infer[f'RD-{backbone}']:.2f}")


if __name__ == "__main__":
    main()
