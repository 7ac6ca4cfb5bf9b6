"""An ``ImageClassifier`` that routes MemoryMamba's memory states to the head during training.

mmpretrain's ``ImageClassifier.loss`` only passes the backbone's feature tuple to the head. The
memory losses (Sec. 4.3 of the MemoryMamba paper) also need each Mem-SSM block's query vectors
and (Z, fine read-out) pairs, so this subclass asks the backbone for them
(``return_memory=True``) and hands them to the head as ``memory=``. Prediction, feature
extraction and everything else are ``ImageClassifier``'s, unchanged.

A NaN or infinite training loss stops the run with :class:`NonFiniteLossError`, naming the
iteration and the likely causes, before the step that would write NaN into the weights (mmengine
0.10.7 has no hook for it; mmdet's ``CheckInvalidLossHook`` is not part of mmengine).
"""

from __future__ import annotations

import copy
import inspect

import torch
from mmengine.logging import MessageHub
from mmpretrain.models.classifiers import ImageClassifier
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample
from torch import Tensor

from .backbone import MemoryMamba

#: How much to divide the learning rate by, as suggested when training diverged.
LR_CUT_ON_DIVERGENCE = 10


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss (or NaN/Inf reached the selective scan); training stops."""


def _fill_head_width(backbone: dict, head: dict | None) -> dict | None:
    """``head.in_channels=None`` becomes the width of the MemoryMamba backbone's last output stage."""
    if not isinstance(head, dict) or head.get("in_channels", 0) is not None:
        return head
    if not isinstance(backbone, dict) or backbone.get("type") not in ("MemoryMamba", MemoryMamba):
        raise ValueError(
            "head.in_channels=None follows a MemoryMamba backbone's arch; set it for other backbones."
        )
    head = copy.deepcopy(head)
    head["in_channels"] = MemoryMamba.output_channels(
        backbone.get("arch", "tiny"), backbone.get("out_indices", (-1,))
    )[-1]
    return head


@MODELS.register_module()
class MemoryMambaClassifier(ImageClassifier):
    """``ImageClassifier`` whose training loss includes the memory losses; same arguments.

    ``head.in_channels=None`` takes the width of the backbone's last output (768 for ``tiny`` and
    ``small``, 1024 for ``base``); an explicit width that does not match a MemoryMamba backbone is
    one clear error at construction instead of a shape error in the first step.

    Args:
        backbone: backbone config.
        neck: neck config.
        head: head config; ``in_channels=None`` follows a MemoryMamba backbone's arch.
        check_finite_loss: raise :class:`NonFiniteLossError` on a NaN/Inf training loss (one
            device synchronisation per step, which mmengine's loss logging makes anyway).
        **kwargs: ``ImageClassifier``'s other arguments.
    """

    def __init__(
        self,
        backbone: dict,
        neck: dict | None = None,
        head: dict | None = None,
        check_finite_loss: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(backbone=backbone, neck=neck, head=_fill_head_width(backbone, head), **kwargs)
        self.check_finite_loss = check_finite_loss
        width = getattr(self.head, "in_channels", None) if self.with_head else None
        if isinstance(self.backbone, MemoryMamba) and isinstance(width, int):
            expected = self.backbone.dims[self.backbone.out_indices[-1]]
            if width != expected:
                raise ValueError(
                    f"head.in_channels={width} does not match the MemoryMamba backbone's last output width "
                    f"{expected}; set head.in_channels={expected} or None (follows the arch)."
                )

    def loss(self, inputs: Tensor, data_samples: list[DataSample]) -> dict[str, Tensor]:
        """The head's losses; :class:`NonFiniteLossError` when they are NaN/Inf (``check_finite_loss``)."""
        if isinstance(self.backbone, MemoryMamba):
            self.backbone.check_input(inputs)  # a shape error stays a shape error, NaN pixels or not
        try:
            losses = self._losses(inputs, data_samples)
        except ValueError as exc:  # the CPU selective scan refuses NaN/Inf before any loss exists
            if self.check_finite_loss and self._non_finite_cause(inputs):
                raise NonFiniteLossError(
                    self._divergence_message(inputs, "NaN/Inf reached the scan")
                ) from exc
            raise
        if self.check_finite_loss:
            terms = {k: v for k, v in losses.items() if "loss" in k and isinstance(v, Tensor)}
            # One synchronisation for all terms; only a failed check looks at them one by one.
            if terms and not bool(
                torch.isfinite(torch.stack([v.detach().sum() for v in terms.values()])).all()
            ):
                bad = [k for k, v in terms.items() if not bool(torch.isfinite(v).all())]
                raise NonFiniteLossError(self._divergence_message(inputs, f"{', '.join(bad)} is NaN/Inf"))
        return losses

    def _losses(self, inputs: Tensor, data_samples: list[DataSample]) -> dict[str, Tensor]:
        if "return_memory" not in inspect.signature(self.backbone.forward).parameters:
            return super().loss(inputs, data_samples)  # any other backbone: plain classification
        feats, memory = self.backbone(inputs, return_memory=True)
        if self.with_neck:
            feats = self.neck(feats)
        return self.head.loss(feats, data_samples, memory=memory)

    @torch.no_grad()
    def _non_finite_cause(self, inputs: Tensor) -> str | None:
        """Where the NaN/Inf comes from when it is not the loss itself: the batch or the weights."""
        if not bool(torch.isfinite(inputs).all()):
            return "the input batch holds NaN/Inf pixels"
        broken = [name for name, p in self.named_parameters() if not bool(torch.isfinite(p).all())]
        if broken:
            return f"the weights are already NaN/Inf ({broken[0]} and {len(broken) - 1} more)"
        return None

    def _divergence_message(self, inputs: Tensor, symptom: str) -> str:
        hub = MessageHub.get_current_instance()
        step, epoch = hub.get_info("iter"), hub.get_info("epoch")
        where = "MemoryMamba training diverged"
        if step is not None:
            where += f" at iteration {step + 1}" + (f" (epoch {epoch + 1})" if epoch is not None else "")
        lr_log = hub.log_scalars.get("train/lr")  # RuntimeInfoHook records it before every iteration
        lr = f"lr {float(lr_log.current()):g}; " if lr_log is not None and len(lr_log.data[0]) else ""
        cause = self._non_finite_cause(inputs)
        return (
            f"{where}: {symptom}{f' ({cause})' if cause else ''}. Likely causes: a learning rate too high "
            f"({lr}divide optim_wrapper.optimizer.lr by {LR_CUT_ON_DIVERGENCE}, or drop --auto-scale-lr), "
            "inputs on the wrong scale or broken (data_preprocessor mean/std must match 0-255 images; NaN "
            "pixels), or fp16 overflow under --amp (train in fp32 or bf16). Fix that and train again."
        )
