"""mmengine hooks that catch two silent failures of a classification run at its start.

- :class:`ClassListCheckHook`: the head's ``num_classes`` and every split's class list agree.
- :class:`PretrainedRequiredHook`: a fine-tuning schedule (the paper's lr 2e-5 for 10 epochs,
  MemoryMamba Sec. 5.2) is not run from random weights without a warning.
"""

from __future__ import annotations

import warnings

from mmengine.hooks import Hook
from mmengine.logging import MMLogger
from mmengine.model import is_model_wrapper
from mmpretrain.registry import HOOKS

#: The configs to use instead of a fine-tuning schedule when no checkpoint is at hand.
FROM_SCRATCH_CONFIG = "configs/memorymamba_<dataset>_scratch.py (e.g. configs/memorymamba_neu_scratch.py)"


def _model(runner):
    return runner.model.module if is_model_wrapper(runner.model) else runner.model


def _dataset_classes(loader) -> tuple[str, ...] | None:
    dataset = getattr(loader, "dataset", None)
    while dataset is not None and not hasattr(dataset, "metainfo") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    classes = getattr(dataset, "metainfo", {}).get("classes") if dataset is not None else None
    return tuple(classes) if classes else None


@HOOKS.register_module()
class ClassListCheckHook(Hook):
    """Before training or testing: one class list across the splits, of the head's ``num_classes``.

    A mismatch would otherwise train without error and shift or drop labels; here it is one
    ``ValueError`` that names the classes found and the setting to change.
    """

    priority = "VERY_HIGH"

    def _check(self, runner, loaders: dict) -> None:
        found = {}
        for name, loader in loaders.items():
            if loader is None or isinstance(loader, dict):
                continue  # not built: this run does not use that split
            classes = _dataset_classes(loader)
            if classes is not None:
                found[name] = classes
        if not found:
            return
        reference_name, reference = next(iter(found.items()))
        for name, classes in found.items():
            if classes != reference:
                raise ValueError(
                    f"The {name} classes {list(classes)} differ from the {reference_name} classes "
                    f"{list(reference)}; give every split the same `classes` in the config."
                )
        head = getattr(_model(runner), "head", None)
        num_classes = getattr(head, "num_classes", None)
        if num_classes is not None and num_classes != len(reference):
            raise ValueError(
                f"model.head.num_classes={num_classes} but the dataset has {len(reference)} classes "
                f"{list(reference)}; set model.head.num_classes={len(reference)} (and "
                f"data_preprocessor.num_classes) in the config or with --cfg-options."
            )

    def before_train(self, runner) -> None:
        val = runner.val_loop.dataloader if runner._val_loop is not None else None
        self._check(runner, {"train": runner.train_dataloader, "val": val})

    def before_test(self, runner) -> None:
        self._check(runner, {"test": runner.test_dataloader})


@HOOKS.register_module()
class PretrainedRequiredHook(Hook):
    """Warn at the start of training when a fine-tuning schedule starts from random weights.

    A backbone with ``init_cfg=dict(type='Pretrained', ...)``, ``load_from`` or a resumed run
    counts as pretrained.

    Args:
        from_scratch_config: the config(s) named in the warning.
    """

    def __init__(self, from_scratch_config: str = FROM_SCRATCH_CONFIG) -> None:
        self.from_scratch_config = from_scratch_config

    def before_train(self, runner) -> None:
        backbone = getattr(_model(runner), "backbone", None)
        init_cfg = getattr(backbone, "init_cfg", None)
        configs = init_cfg if isinstance(init_cfg, list) else [init_cfg]
        pretrained = any(isinstance(c, dict) and c.get("type") == "Pretrained" for c in configs)
        if pretrained or runner._load_from or runner._resume:
            return
        message = (
            "This config uses the paper's fine-tuning schedule (a small lr for few epochs), but the backbone "
            "starts from random weights: no `init_cfg=dict(type='Pretrained', checkpoint=...)`, `load_from` or "
            "resume. It will barely train. Pass a VMamba checkpoint (`--cfg-options "
            "model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH`) or train with "
            f"the from-scratch recipe, {self.from_scratch_config}."
        )
        MMLogger.get_current_instance().warning(message)
        warnings.warn(message, UserWarning, stacklevel=1)
