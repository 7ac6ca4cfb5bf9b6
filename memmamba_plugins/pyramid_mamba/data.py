"""Multi-class MVTec AD datamodule: ONE model over several (default: all 15) categories.

Pyramid-Mamba (Iqbal et al., 2025, Sec. 4) follows the multi-class ("unified") protocol of UniAD and
MambaAD: the training set is the union of the normal images of all categories and the metrics are
computed per category, then averaged. anomalib 2.x has no multi-class mode and no ``MVTec`` datamodule
(it was renamed ``MVTecAD``); this module provides ``--data MVTec`` built from anomalib's own
:class:`~anomalib.data.datasets.image.mvtecad.MVTecADDataset`, one per category, concatenated, with a
``category`` column that :class:`~memmamba_plugins.pyramid_mamba.evaluator.MultiClassEvaluator`
reads to group the metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.datasets.image.mvtecad import CATEGORIES, MVTecADDataset
from anomalib.data.utils import Split, TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Transform

#: Where MVTec AD is published; it needs a registration form, so we never download it ourselves.
MVTEC_AD_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
#: Name used for the results folder when all categories are trained together.
ALL_CATEGORIES_NAME = "multiclass"


class MVTecDatasetNotFoundError(FileNotFoundError):
    """MVTec AD (or a requested category) is not under ``root``."""


class MVTec(AnomalibDataModule):
    """MVTec AD in the multi-class setting (paper protocol).

    Args:
        root: folder holding one sub-folder per category in MVTec AD layout
            (``<root>/<category>/{train/good, test/<defect>, ground_truth/<defect>}``).
        categories: categories to train one model on; ``None`` = all 15.
        train_batch_size: training batch size (paper: 16).
        eval_batch_size: evaluation batch size.
        num_workers: data-loader workers.
        train_augmentations, val_augmentations, test_augmentations, augmentations: as anomalib's
            datamodules (the paper uses none).
        test_split_mode, test_split_ratio, val_split_mode, val_split_ratio, seed: as anomalib's
            ``MVTecAD``; the default validates on the test set, like the paper's code.

    Raises:
        MVTecDatasetNotFoundError: in ``prepare_data``/``setup`` when ``root`` or a category is
            missing; the message names the official download page. No download is attempted.
    """

    def __init__(
        self,
        root: Path | str = "./datasets/MVTecAD",
        categories: Sequence[str] | None = None,
        train_batch_size: int = 16,
        eval_batch_size: int = 16,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        test_split_mode: TestSplitMode | str = TestSplitMode.FROM_DIR,
        test_split_ratio: float = 0.2,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=test_split_mode,
            test_split_ratio=test_split_ratio,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        self.root = Path(root).expanduser()
        chosen = list(CATEGORIES) if categories is None else [str(c) for c in categories]
        if isinstance(categories, str) or not chosen or len(set(chosen)) != len(chosen):
            msg = f"categories must be a non-empty list of distinct names, got {categories!r}."
            raise ValueError(msg)
        self.categories = chosen
        self.category = ALL_CATEGORIES_NAME if sorted(chosen) == sorted(CATEGORIES) else "_".join(chosen)

    @property
    def name(self) -> str:
        """The root folder's name (``MVTecAD``, ``industrial_ad``, ...).

        anomalib's visualizer keeps the part of an image's path below the folder of this name, so
        heat maps land in ``images/<category>/test/<defect>/`` and images of different categories
        with the same file name never overwrite each other. It also names the results folder.
        """
        return self.root.resolve().name or type(self).__name__

    def _check_root(self) -> None:
        missing = [c for c in self.categories if not (self.root / c).is_dir()]
        if not missing:
            return
        where = "does not exist" if not self.root.is_dir() else f"lacks the categories {missing}"
        msg = (
            f"MVTec AD root {str(self.root)!r} {where}. Download MVTec AD from the official page {MVTEC_AD_URL} "
            "(it requires accepting the licence), extract it, and pass the folder that holds the category "
            "sub-folders with `--data.root <dir>`; choose categories with `--data.categories '[bottle, cable]'`. "
            "Nothing is downloaded automatically."
        )
        raise MVTecDatasetNotFoundError(msg)

    def prepare_data(self) -> None:
        """Check that the data is there; never download (MVTec AD needs a licence click-through)."""
        self._check_root()

    def _split(self, split: Split) -> MVTecADDataset:
        dataset = None
        for category in self.categories:
            part = MVTecADDataset(root=self.root, category=category, split=split)
            samples = part.samples.copy()
            samples["category"] = category
            samples.attrs.update(part.samples.attrs)
            part.samples = samples
            dataset = part if dataset is None else dataset + part
        assert dataset is not None  # categories is non-empty (checked in __init__)
        dataset.samples.attrs.update(part.samples.attrs)
        dataset.category = self.category
        return dataset

    def _setup(self, _stage: str | None = None) -> None:
        self._check_root()
        self.train_data = self._split(Split.TRAIN)
        self.test_data = self._split(Split.TEST)
