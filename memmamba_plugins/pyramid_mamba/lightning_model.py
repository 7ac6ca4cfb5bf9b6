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

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib import LearningType
from anomalib.data import Batch, InferenceBatch
from anomalib.engine.plugins.checkpoint_io import AnomalibCheckpointIO
from anomalib.metrics import AUPR, AUPRO, AUROC, Evaluator, F1Max
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import optim
from torchvision.transforms.v2 import Compose, Normalize, Resize

from memmamba_plugins import pretrained

from .checkpoint import CheckedCheckpointIO, check_checkpoint_file
from .evaluator import MultiClassEvaluator
from .loss import DEFAULT_LOSS_TYPE, DEFAULT_LOSS_WEIGHT, PyramidMambaLoss
from .torch_model import (
    DEFAULT_BACKBONE,
    DEFAULT_CSS_MODULES,
    DEFAULT_D_STATE,
    DEFAULT_DEPTHS,
    DEFAULT_DIMS,
    DEFAULT_DROP_PATH,
    DEFAULT_INPUT_SIZE,
    DEFAULT_LAYERS,
    DEFAULT_LEC_KERNELS,
    DEFAULT_MFF_BLOCKS,
    DEFAULT_NOISE_STD,
    DEFAULT_PYRAMID_LEVELS,
    DEFAULT_SSM_EXPAND,
    PyramidMambaModel,
    check_images,
)

#: Paper text's optimiser: Adam, learning rate 5e-4, weight decay 1e-4.
PAPER_ADAM_LR = 5e-4
#: Official code's optimiser: AdamW, learning rate 5e-3 per 16 images of a batch.
CODE_ADAMW_LR_PER_16 = 5e-3
#: The batch size that CODE_ADAMW_LR_PER_16 refers to.
CODE_LR_BATCH = 16
OPTIMIZERS = ("adam", "adamw")
DEFAULT_OPTIMIZER = "adam"
DEFAULT_WEIGHT_DECAY = 1e-4
#: Official code's schedule: learning rate x0.1 at 80 % of the epochs.
DEFAULT_LR_DECAY_AT = 0.8
LR_DECAY_FACTOR = 0.1
#: Official code's gradient clipping (a default only: the CLI's --trainer.gradient_clip_val wins).
DEFAULT_GRADIENT_CLIP = 5.0
#: AUPRO integrates the PRO curve up to this false-positive rate (MVTec AD convention).
AUPRO_FPR_LIMIT = 0.3
#: Suggested learning-rate cut when training diverges.
LR_CUT_ON_DIVERGENCE = 10
#: Checkpoint entry with the random-number generators' states at the moment of saving (see
#: :meth:`PyramidMamba.on_save_checkpoint`); older checkpoints without it resume as before.
RNG_STATES_KEY = "pyramid_mamba_rng_states"


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss (or NaN/Inf reached the decoder); training stops."""


class PyramidMamba(AnomalibModule):
    """Pyramid-Mamba multi-class anomaly detector (paper Fig. 1) for anomalib.

    Args:
        backbone: timm CNN for the frozen encoder (paper: ``resnet34``).
        layers: encoder features reconstructed by the decoder, finest first.
        pre_trained: ImageNet weights for the encoder (paper: yes). Offline, pass ``weights_path``
            or ``pre_trained=False``.
        weights_path: local timm/torchvision checkpoint of ``backbone``.
        input_size: square input side(s) for the default pre-processor (Resize + the encoder's
            pretrained normalisation); ``None`` = 256x256. Ignored when a ``pre_processor`` is passed.
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
        blur_sigma: anomaly-map Gaussian blur; ``None`` = 4 at 256x256, scaled with the input size.
        use_pyramid: ablation, ``False`` = no pyramid (level 0 only).
        use_lec: ablation, ``False`` = no LEC branches.
        use_noise: ablation, ``False`` = no feature noise.
        loss_weight: weight of the summed multi-scale loss (5).
        loss_type: ``"mse"`` (paper) or ``"cosine"`` (``1 - cos``, what the anomaly map measures).
        optimizer: ``"adam"`` (paper text) or ``"adamw"`` (official code).
        lr: learning rate; ``None`` = the optimiser's published default: 5e-4 for Adam (paper),
            5e-3 x batch / 16 for AdamW (code).
        weight_decay: weight decay (paper and code: 1e-4).
        lr_decay_at: fraction of ``max_epochs`` after which the learning rate is multiplied by 0.1
            (official code: 0.8); ``None`` keeps it constant.
        warmup_steps: optimiser steps of linear learning-rate warm-up (0: none).
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
        blur_sigma: float | None = None,
        use_pyramid: bool = True,
        use_lec: bool = True,
        use_noise: bool = True,
        loss_weight: float = DEFAULT_LOSS_WEIGHT,
        loss_type: str = DEFAULT_LOSS_TYPE,
        optimizer: str = DEFAULT_OPTIMIZER,
        lr: float | None = None,
        weight_decay: float = DEFAULT_WEIGHT_DECAY,
        lr_decay_at: float | None = DEFAULT_LR_DECAY_AT,
        warmup_steps: int = 0,
        per_category_metrics: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if pre_processor is True:
            size = None if input_size is None else _as_size(input_size)
            pre_processor = self.configure_pre_processor(size, backbone=backbone)
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
        self.loss = PyramidMambaLoss(loss_weight, loss_type)
        if optimizer not in OPTIMIZERS:
            msg = f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}."
            raise ValueError(msg)
        if warmup_steps < 0:
            msg = f"warmup_steps must be >= 0, got {warmup_steps}."
            raise ValueError(msg)
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_decay_at = lr_decay_at
        self.warmup_steps = warmup_steps

    # -- anomalib components ------------------------------------------------------------------
    @staticmethod
    def configure_pre_processor(
        image_size: tuple[int, int] | None = None, backbone: str = DEFAULT_BACKBONE
    ) -> PreProcessor:
        """Resize to ``image_size`` (256x256) and normalise as the encoder's pretrained weights expect.

        The statistics come from timm's pretrained config of ``backbone``: ImageNet mean/std for
        ``resnet34``, ``[-1, 1]`` for ``tf_efficientnet_lite0``. The pre-processor is part of the
        model, so training, ``predict`` and every exported model normalise alike.
        """
        mean, std = pretrained.normalization(backbone)
        return PreProcessor(
            transform=Compose(
                [Resize(image_size or DEFAULT_INPUT_SIZE, antialias=True), Normalize(mean, std)]
            )
        )

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
    def learning_rate(self) -> float:
        """``lr``, or the chosen optimiser's published default for the training batch size.

        ``adam``: 5e-4 (paper text). ``adamw``: 5e-3 x batch / 16 (official code).
        """
        if self.lr is not None:
            return self.lr
        if self.optimizer_name == "adam":
            return PAPER_ADAM_LR
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        batch = getattr(datamodule, "train_batch_size", CODE_LR_BATCH)
        return CODE_ADAMW_LR_PER_16 * batch / CODE_LR_BATCH

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam or AdamW on the trainable parts; linear warm-up per step; x0.1 at 80 % of the epochs."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        cls = optim.Adam if self.optimizer_name == "adam" else optim.AdamW
        optimizer = cls(params, lr=self.learning_rate(), weight_decay=self.weight_decay)
        config: dict[str, Any] = {"optimizer": optimizer}
        total_steps = self._total_training_steps()
        decay_step = None
        if self.lr_decay_at is not None and total_steps:
            decay_step = max(1, int(round(self.lr_decay_at * total_steps)))
        if decay_step is None and not self.warmup_steps:
            return config
        warmup = self.warmup_steps

        def factor(step: int) -> float:
            scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
            return scale * LR_DECAY_FACTOR if decay_step is not None and step >= decay_step else scale

        config["lr_scheduler"] = {
            "scheduler": optim.lr_scheduler.LambdaLR(optimizer, factor),
            "interval": "step",
        }
        return config

    def _total_training_steps(self) -> int | None:
        """Optimiser steps of the whole fit, when the Trainer knows them (bounded ``max_epochs``)."""
        if self._trainer is None:
            return None
        max_epochs = getattr(self.trainer, "max_epochs", None)
        if not max_epochs or max_epochs < 0:
            return None
        steps = self.trainer.estimated_stepping_batches
        return int(steps) if steps != float("inf") else None

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Multi-scale MSE between the frozen encoder's and the decoder's features.

        Raises:
            NonFiniteLossError: when the loss is NaN/Inf, or NaN/Inf reaches the decoder's selective
                scan (which refuses it) before there is a loss; the message names the step and the
                likely causes. Lightning has no such check of its own (``terminate_on_nan`` is gone and
                ``detect_anomaly`` only looks at the backward pass), so it happens here, on every device.
        """
        del args, kwargs
        encoder_features, decoder_features = self._run_model(batch.image)
        loss = self.loss(encoder_features, decoder_features)
        # One host sync per step, as the progress bar's loss display already does.
        if not bool(torch.isfinite(loss)):
            cause = self._non_finite_cause(batch.image) or f"the loss is {loss.item()}"
            raise NonFiniteLossError(self._divergence_message(cause))
        self.log(
            "train_loss",
            loss.detach(),
            on_epoch=True,
            prog_bar=True,
            logger=True,
            batch_size=len(batch.image),
        )
        return {"loss": loss}

    def _run_model(self, images: torch.Tensor) -> Any:
        """``self.model(images)``; NaN/Inf that the selective scan refuses becomes :class:`NonFiniteLossError`."""
        try:
            return self.model(images)
        except ValueError as exc:
            cause = self._non_finite_cause(images)
            if cause is None:  # a ValueError about something else: leave it as it is
                raise
            raise NonFiniteLossError(self._divergence_message(cause)) from exc

    def _non_finite_cause(self, images: torch.Tensor) -> str | None:
        """Where NaN/Inf comes from, in words; ``None`` when the forward pass is finite throughout.

        In order: the batch, the trainable weights, or the first layer whose output overflows (the
        weights are finite but huge).
        """
        if not bool(torch.isfinite(images).all()):
            return "the input batch holds NaN/Inf pixels"
        diverged = [
            name
            for name, p in self.model.named_parameters()
            if p.requires_grad and not bool(torch.isfinite(p).all())
        ]
        if diverged:
            return f"{len(diverged)} weight tensors hold NaN/Inf (first: {diverged[0]}), so an earlier update diverged"
        # Weights can be finite but so large that an activation overflows; a hooked re-run (only on this
        # failure path, without gradients) names the first module whose output is not finite.
        culprits: list[str] = []

        def record(name: str) -> Any:
            def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
                if (
                    not culprits
                    and isinstance(output, torch.Tensor)
                    and not bool(torch.isfinite(output).all())
                ):
                    culprits.append(name)

            return hook

        handles = [
            module.register_forward_hook(record(name)) for name, module in self.model.named_modules() if name
        ]
        try:
            with torch.no_grad():
                self.model(images)
        except ValueError:  # the selective scan refuses the non-finite input again, after the hook saw it
            pass
        finally:
            for handle in handles:
                handle.remove()
        if culprits:
            return f"the output of {culprits[0]} overflowed to NaN/Inf although the weights are finite (they grew too large)"
        return None

    def _divergence_message(self, cause: str) -> str:
        trainer = self._trainer
        optimizers = trainer.optimizers if trainer is not None else []
        lr = optimizers[0].param_groups[0]["lr"] if optimizers else self.learning_rate()
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        where = (
            f"PyramidMamba training diverged at epoch {self.current_epoch}, after {self.global_step} optimizer steps"
            if fitting
            else "PyramidMamba's weights do not give finite outputs (they come from a training run that diverged)"
        )
        return (
            f"{where}: {cause}. Likely causes: a learning rate too high for this data (lr {lr:g}; try "
            f"`--model.lr {lr / LR_CUT_ON_DIVERGENCE:g}`), gradient clipping switched off (the default clips at "
            f"norm {DEFAULT_GRADIENT_CLIP:g}; see `--trainer.gradient_clip_val`), or inputs on the wrong scale "
            "(images must be floats in [0, 1] normalised by the model's pre-processor: a custom pre_processor "
            "without Normalize, 0-255 pixels or NaN pixels in the data all do this). Fix that and train again."
        )

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Anomaly maps and scores for the evaluator."""
        del args, kwargs
        predictions = self._run_model(batch.image)
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

    # -- bad input --------------------------------------------------------------------------------
    def forward(self, batch: torch.Tensor, *args, **kwargs) -> InferenceBatch:
        """anomalib's pipeline (pre-processor, model, post-processor) on a ``(B, 3, H, W)`` batch.

        The batch is checked before the pre-processor, whose ``Normalize`` would otherwise fail on 4
        channels with a broadcasting error (and silently broadcast 1 channel).
        """
        check_images(batch)
        return super().forward(batch, *args, **kwargs)

    def setup(self, stage: str) -> None:
        """Check ``--ckpt_path`` files before Lightning loads them (see :mod:`.checkpoint`).

        The Trainer hands the path only to its checkpoint IO, after this hook; so the
        :class:`AnomalibCheckpointIO` that anomalib's Engine installs is swapped for a subclass that
        checks the file first and otherwise loads exactly as anomalib does (same allow-list, same
        ``weights_only``). A checkpoint IO that the user configured is left alone.
        """
        super().setup(stage)
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is AnomalibCheckpointIO:
            strategy.checkpoint_io = CheckedCheckpointIO(strategy.checkpoint_io.extra_safe_globals)

    # -- resume -----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """anomalib's entries, plus the random-number generators' states (:data:`RNG_STATES_KEY`).

        ``--ckpt_path`` makes Lightning restore the weights, optimiser, schedulers and loop counters, but
        no random-number generator: a resumed fit would shuffle the next epoch and draw the feature noise
        and drop-path masks differently from the run it continues (the toy run of ``tests/test_faults.py``
        ended up to 0.16 apart in its weights, with other test metrics). With the states saved, resuming
        from an epoch's checkpoint gives the uninterrupted run's weights, bit for bit.
        """
        super().on_save_checkpoint(checkpoint)
        checkpoint[RNG_STATES_KEY] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """anomalib's restore; when resuming a fit, also the saved random-number generators' states.

        Only a fit continues them: ``test``/``predict --ckpt_path`` and :meth:`load_from_checkpoint`
        leave the process's generators alone. Under DDP the file holds rank 0's states, and every
        process continues from them (with ``seed_everything`` all ranks start from the same states).
        """
        super().on_load_checkpoint(checkpoint)
        states = checkpoint.get(RNG_STATES_KEY)
        if states is not None and self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            _set_rng_states(states)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args, **kwargs) -> PyramidMamba:
        """anomalib's ``load_from_checkpoint``, after :func:`~.checkpoint.check_checkpoint_file`.

        Raises:
            CorruptCheckpointError: the file is truncated or corrupt (named in the message).
        """
        check_checkpoint_file(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    @property
    def learning_type(self) -> LearningType:
        """Trained on normal images only."""
        return LearningType.ONE_CLASS

    @classmethod
    def checkpoint_safe_globals(cls) -> Sequence[Any]:
        """Types in our hyper-parameters that ``weights_only`` checkpoint loading must allow."""
        return (Path, torch.Size)


def _rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python generator states, as tensors and plain data.

    Plain data so that anomalib's ``weights_only`` checkpoint loading reads them without an allow-list.
    """
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`_rng_states` saved (CUDA only onto the same number of devices)."""
    torch.set_rng_state(states["torch"])
    keys, pos, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


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
