"""Pyramid-Mamba as an anomalib model (``anomalib train --model PyramidMamba``).

Reference:
    Iqbal et al., "Pyramid-based Mamba Multi-class Unsupervised Anomaly Detection", 2025
    (``shared/papers/002``). Sec. 4 "Implementation details": 256x256 inputs, ResNet34 encoder,
    2 pyramid levels, feature noise, sum of multi-scale MSE, Adam with lr 5e-4 and decay 1e-4.

Example:
    >>> from anomalib.engine import Engine
    >>> from memmamba_plugins.pyramid_mamba import MVTec, PyramidMamba
    >>> model = PyramidMamba(pre_trained=False)                       # doctest: +SKIP
    >>> Engine(max_epochs=500).train(model, datamodule=MVTec(root="datasets/MVTecAD"))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import AUPR, AUPRO, AUROC, Evaluator, F1Max
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import optim

from .evaluator import MultiClassEvaluator
from .loss import DEFAULT_LOSS_WEIGHT, PyramidMambaLoss
from .torch_model import (
    DEFAULT_BACKBONE,
    DEFAULT_BLUR_SIGMA,
    DEFAULT_CSS_MODULES,
    DEFAULT_D_STATE,
    DEFAULT_DEPTHS,
    DEFAULT_DIMS,
    DEFAULT_DROP_PATH,
    DEFAULT_LAYERS,
    DEFAULT_LEC_KERNELS,
    DEFAULT_MFF_BLOCKS,
    DEFAULT_NOISE_STD,
    DEFAULT_PYRAMID_LEVELS,
    DEFAULT_SSM_EXPAND,
    PyramidMambaModel,
)

#: Paper optimiser: Adam, learning rate 5e-4, weight decay 1e-4.
DEFAULT_LR = 5e-4
DEFAULT_WEIGHT_DECAY = 1e-4
#: Official code's schedule: learning rate x0.1 at 80 % of the epochs.
DEFAULT_LR_DECAY_AT = 0.8
LR_DECAY_FACTOR = 0.1
#: Official code's gradient clipping (a default only: the CLI's --trainer.gradient_clip_val wins).
DEFAULT_GRADIENT_CLIP = 5.0
#: AUPRO integrates the PRO curve up to this false-positive rate (MVTec AD convention).
AUPRO_FPR_LIMIT = 0.3


class PyramidMamba(AnomalibModule):
    """Pyramid-Mamba multi-class anomaly detector (paper Fig. 1) for anomalib.

    Args:
        backbone: timm CNN for the frozen encoder (paper: ``resnet34``).
        layers: encoder features reconstructed by the decoder, finest first.
        pre_trained: ImageNet weights for the encoder (paper: yes). Offline, pass ``weights_path``
            or ``pre_trained=False``.
        weights_path: local timm/torchvision checkpoint of ``backbone``.
        input_size: square input side(s) for the default pre-processor (Resize + ImageNet
            normalisation); ``None`` = 256x256. Ignored when a ``pre_processor`` is passed.
        decoder_dims: decoder stage channels (512/256/128/64).
        decoder_depths: SS2D blocks per decoder stage (3/4/6/3).
        css_modules: CSS modules per stage (1/2/2/1).
        d_state: SSM state size (16).
        ssm_expand: SS2D inner width factor (2).
        pyramid_levels: PSS levels (0, 1).
        lec_kernels: LEC depthwise kernels (5, 7).
        noise_std: training feature noise std (0.05).
        drop_path_rate: stochastic depth over the decoder (0.2).
        mff_blocks: Bottleneck blocks in the MFF (3).
        blur_sigma: anomaly-map Gaussian blur (4).
        use_pyramid: ablation, ``False`` = no pyramid (level 0 only).
        use_lec: ablation, ``False`` = no LEC branches.
        use_noise: ablation, ``False`` = no feature noise.
        loss_weight: weight of the summed multi-scale MSE (5).
        lr: Adam learning rate (paper: 5e-4).
        weight_decay: Adam weight decay (paper: 1e-4).
        lr_decay_at: fraction of ``max_epochs`` after which the learning rate is multiplied by 0.1
            (official code: 0.8); ``None`` keeps it constant.
        per_category_metrics: log ``<category>/<metric>`` and ``mean/<metric>`` besides the pooled
            metrics (only used by the default evaluator).
        pre_processor, post_processor, evaluator, visualizer: anomalib components, or ``True`` for
            the defaults.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] = DEFAULT_LAYERS,
        pre_trained: bool = True,
        weights_path: str | None = None,
        input_size: int | Sequence[int] | None = None,
        decoder_dims: Sequence[int] = DEFAULT_DIMS,
        decoder_depths: Sequence[int] = DEFAULT_DEPTHS,
        css_modules: Sequence[int] = DEFAULT_CSS_MODULES,
        d_state: int = DEFAULT_D_STATE,
        ssm_expand: float = DEFAULT_SSM_EXPAND,
        pyramid_levels: Sequence[int] = DEFAULT_PYRAMID_LEVELS,
        lec_kernels: Sequence[int] = DEFAULT_LEC_KERNELS,
        noise_std: float = DEFAULT_NOISE_STD,
        drop_path_rate: float = DEFAULT_DROP_PATH,
        mff_blocks: int = DEFAULT_MFF_BLOCKS,
        blur_sigma: float = DEFAULT_BLUR_SIGMA,
        use_pyramid: bool = True,
        use_lec: bool = True,
        use_noise: bool = True,
        loss_weight: float = DEFAULT_LOSS_WEIGHT,
        lr: float = DEFAULT_LR,
        weight_decay: float = DEFAULT_WEIGHT_DECAY,
        lr_decay_at: float | None = DEFAULT_LR_DECAY_AT,
        per_category_metrics: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if pre_processor is True and input_size is not None:
            pre_processor = self.configure_pre_processor(_as_size(input_size))
        # configure_evaluator is called by the base class before our attributes exist.
        self._per_category_default = per_category_metrics
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        size = self.input_size
        if size is None:
            msg = "PyramidMamba needs a pre-processor that resizes to a fixed size (e.g. input_size=256)."
            raise ValueError(msg)
        self.model = PyramidMambaModel(
            backbone=backbone,
            layers=layers,
            pre_trained=pre_trained,
            weights_path=weights_path,
            input_size=(int(size[0]), int(size[1])),
            decoder_dims=decoder_dims,
            decoder_depths=decoder_depths,
            css_modules=css_modules,
            d_state=d_state,
            ssm_expand=ssm_expand,
            pyramid_levels=pyramid_levels,
            lec_kernels=lec_kernels,
            noise_std=noise_std,
            drop_path_rate=drop_path_rate,
            mff_blocks=mff_blocks,
            blur_sigma=blur_sigma,
            use_pyramid=use_pyramid,
            use_lec=use_lec,
            use_noise=use_noise,
        )
        self.loss = PyramidMambaLoss(loss_weight)
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_decay_at = lr_decay_at

    # -- anomalib components ------------------------------------------------------------------
    def configure_evaluator(self) -> Evaluator:
        """Image AUROC/AP/F1max and pixel AUROC/AP/F1max/AUPRO; per category and mean (paper Tab. 1-2)."""
        test_metrics = [
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUPR(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Max(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPR(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Max(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(
                fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=AUPRO_FPR_LIMIT
            ),
        ]
        per_category = getattr(self, "_per_category_default", True)
        return MultiClassEvaluator(test_metrics=test_metrics, per_category=per_category)

    # -- training -------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        """Adam(lr 5e-4, weight decay 1e-4) on the trainable parts; x0.1 at 80 % of the epochs."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        max_epochs = getattr(self.trainer, "max_epochs", None) if self._trainer is not None else None
        if self.lr_decay_at is None or not max_epochs or max_epochs < 0:
            return {"optimizer": optimizer}
        milestone = max(1, int(round(self.lr_decay_at * max_epochs)))
        scheduler = optim.lr_scheduler.MultiStepLR(optimizer, milestones=[milestone], gamma=LR_DECAY_FACTOR)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Multi-scale MSE between the frozen encoder's and the decoder's features."""
        del args, kwargs
        encoder_features, decoder_features = self.model(batch.image)
        loss = self.loss(encoder_features, decoder_features)
        self.log("train_loss", loss.detach(), on_epoch=True, prog_bar=True, logger=True)
        return {"loss": loss}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Anomaly maps and scores for the evaluator."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No forced Trainer arguments (anomalib would let them override the user's CLI).

        Gradient clipping 5 (official code) is applied in :meth:`configure_gradient_clipping`
        unless the user sets ``--trainer.gradient_clip_val``.
        """
        return {}

    def configure_gradient_clipping(
        self,
        optimizer: optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip gradients at norm 5 by default; the Trainer's setting wins when given."""
        if gradient_clip_val is None:
            gradient_clip_val, gradient_clip_algorithm = DEFAULT_GRADIENT_CLIP, "norm"
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @property
    def learning_type(self) -> LearningType:
        """Trained on normal images only."""
        return LearningType.ONE_CLASS

    @classmethod
    def checkpoint_safe_globals(cls) -> Sequence[Any]:
        """Types in our hyper-parameters that ``weights_only`` checkpoint loading must allow."""
        return (Path, torch.Size)


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    values = [int(s) for s in size]
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2:
        msg = f"input_size must be an int or (height, width), got {size!r}."
        raise ValueError(msg)
    return values[0], values[1]
