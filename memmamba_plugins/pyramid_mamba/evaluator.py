"""Per-category metrics for the multi-class setting, on top of anomalib's :class:`Evaluator`.

Pyramid-Mamba's tables (paper Tab. 1-2) are the MEAN over the 15 MVTec AD categories of metrics
computed per category, while anomalib's Evaluator pools the whole test set. This evaluator keeps
the pooled metrics (logged under their usual names, e.g. ``image_AUROC``) and adds, for every test
metric, one copy per category (``<category>/<metric>``) and their mean (``mean/<metric>``).

Categories come from the datamodule: a ``category`` column in the test samples (our multi-class
:class:`~memmamba_plugins.pyramid_mamba.data.MVTec`), else the datamodule's single ``category``
(anomalib's ``MVTecAD``), else its ``name`` (e.g. ``Folder``). They are fixed in ``setup`` so that
every process of a distributed run holds the same metric copies in the same order.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from anomalib.metrics import AnomalibMetric, Evaluator
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.types import STEP_OUTPUT

logger = logging.getLogger(__name__)

#: Prefix of the logged means over categories (the paper's numbers).
MEAN_PREFIX = "mean"
#: Category used when the datamodule does not name one.
DEFAULT_CATEGORY = "all"


def _category_map(trainer: Trainer) -> tuple[list[str], dict[str, str]]:
    """Categories of the test set and an ``image_path -> category`` map (empty when single)."""
    datamodule = getattr(trainer, "datamodule", None)
    samples = None
    for attr in ("test_data", "val_data"):
        try:
            frame = getattr(datamodule, attr).samples
        except (AttributeError, RuntimeError):  # no such subset, or it has no samples yet
            frame = None
        if frame is not None and "category" in frame.columns:
            samples = frame if samples is None else samples
            if attr == "test_data":
                break
    if samples is not None:
        mapping = dict(zip(samples["image_path"].astype(str), samples["category"].astype(str), strict=True))
        return sorted(set(mapping.values())), mapping
    name = getattr(datamodule, "category", None) or getattr(datamodule, "name", None) or DEFAULT_CATEGORY
    return [str(name)], {}


class MultiClassEvaluator(Evaluator):
    """Anomalib Evaluator plus per-category copies of the test metrics and their mean.

    Args:
        val_metrics: pooled validation metrics.
        test_metrics: test metrics; pooled, per category and mean over categories.
        compute_on_cpu: as :class:`anomalib.metrics.Evaluator`.
        per_category: add the per-category and mean metrics.
    """

    def __init__(
        self,
        val_metrics: AnomalibMetric | Sequence[AnomalibMetric] | None = None,
        test_metrics: AnomalibMetric | Sequence[AnomalibMetric] | None = None,
        compute_on_cpu: bool = True,
        per_category: bool = True,
    ) -> None:
        super().__init__(val_metrics=val_metrics, test_metrics=test_metrics, compute_on_cpu=compute_on_cpu)
        self.per_category = per_category
        self.categories: list[str] = []
        self._path_to_category: dict[str, str] = {}
        # A plain dict on purpose: the copies are rebuilt in every `setup` and must not enter the
        # model's state_dict (a checkpoint would otherwise depend on the categories it was tested on).
        self._category_metrics: dict[str, list[AnomalibMetric]] = {}
        self._metric_device = torch.device("cpu")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Fix the categories from the datamodule and build one metric copy per category."""
        super().setup(trainer, pl_module, stage)
        if not self.per_category:
            return
        self.categories, self._path_to_category = _category_map(trainer)
        # Like anomalib's Evaluator: CPU for one device; the module's device when several processes
        # synchronise states (NCCL cannot gather CPU tensors).
        single = trainer.num_devices <= 1 and self.compute_on_cpu
        self._metric_device = torch.device("cpu") if single else pl_module.device
        self._category_metrics = {
            category: [self._fresh_copy(metric) for metric in self.test_metrics]
            for category in self.categories
        }

    def _fresh_copy(self, metric: AnomalibMetric) -> AnomalibMetric:
        clone = copy.deepcopy(metric).to(self._metric_device)
        clone.reset()
        return clone

    def _category_of(self, path: str) -> str:
        if not self._path_to_category:
            return self.categories[0]
        return self._path_to_category.get(str(path), DEFAULT_CATEGORY)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: STEP_OUTPUT | None,
        batch: Any,  # noqa: ANN401 - anomalib Batch
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Update the pooled metrics, then each category's copies with its slice of the batch."""
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if not self._category_metrics:
            return
        paths = list(getattr(batch, "image_path", None) or [])
        if not paths:
            return
        labels = [self._category_of(p) for p in paths]
        for category in sorted(set(labels)):
            if category not in self._category_metrics:  # a path outside the datamodule's samples
                self._category_metrics[category] = [self._fresh_copy(m) for m in self.test_metrics]
            index = torch.tensor([i for i, c in enumerate(labels) if c == category], dtype=torch.long)
            for metric in self._category_metrics[category]:
                metric.update(self._slice(batch, metric.fields, index))

    def _slice(self, batch: Any, fields: Sequence[str], index: torch.Tensor) -> SimpleNamespace:  # noqa: ANN401
        values = {}
        for field in fields:
            value = getattr(batch, field, None)
            if isinstance(value, torch.Tensor):
                value = value.detach()[index.to(value.device)].to(self._metric_device)
            values[field] = value
        return SimpleNamespace(**values)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log pooled metrics, ``<category>/<metric>`` and ``mean/<metric>``."""
        super().on_test_epoch_end(trainer, pl_module)
        if not self._category_metrics:
            return
        per_metric: dict[str, list[float]] = {}
        for category, metrics in self._category_metrics.items():
            for metric in metrics:
                try:
                    value = float(metric.compute())
                except Exception as exc:  # e.g. AUROC of a category whose test set has one class
                    logger.warning("%s/%s could not be computed: %s", category, metric.name, exc)
                    value = math.nan
                metric.reset()
                per_metric.setdefault(metric.name, []).append(value)
                self._log(trainer, pl_module, f"{category}/{metric.name}", value)
        for name, values in per_metric.items():
            finite = [v for v in values if not math.isnan(v)]
            mean = sum(finite) / len(finite) if finite else math.nan
            self._log(trainer, pl_module, f"{MEAN_PREFIX}/{name}", mean)

    @staticmethod
    def _log(trainer: Trainer, pl_module: LightningModule, name: str, value: float) -> None:
        tensor = torch.tensor(value, dtype=torch.float32)
        if trainer.barebones:  # logging is off; expose the value like anomalib's Evaluator does
            trainer.callback_metrics[name] = tensor
            trainer.logged_metrics[name] = tensor
        else:
            # torchmetrics already synchronised the states, so every process holds the same value; the
            # mean over processes below changes nothing and keeps Lightning's epoch-level checks quiet.
            pl_module.log(name, value, sync_dist=True)
