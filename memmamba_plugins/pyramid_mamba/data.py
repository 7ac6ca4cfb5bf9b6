"""Multi-class MVTec AD datamodule: ONE model over several (default: all 15) categories.

Pyramid-Mamba (Iqbal et al., 2025, Sec. 4) follows the multi-class ("unified") protocol of UniAD and
MambaAD: the training set is the union of the normal images of all categories and the metrics are
computed per category, then averaged. anomalib 2.x has no multi-class mode and no ``MVTec`` datamodule
(it was renamed ``MVTecAD``); this module provides ``--data MVTec``: one dataset per category, built by
anomalib's own :func:`~anomalib.data.datasets.image.mvtecad.make_mvtec_ad_dataset` (the function behind
``MVTecADDataset``, here with JPEG images accepted besides PNG), concatenated, with a ``category`` column
that :class:`~memmamba_plugins.pyramid_mamba.evaluator.MultiClassEvaluator` reads to group the metrics.

Bad data is refused in ``setup``, before training, with one message naming the folder or file and the
fix: a missing ``ground_truth/`` folder or masks, an empty ``train/good``, a category without defect
test images, good test images in only some categories, unreadable files, 16-bit grey images (anomalib's
reader would clip them to white), JPEG masks and masks of another size than their image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.datasets.base import AnomalibDataset
from anomalib.data.datasets.image.mvtecad import CATEGORIES, make_mvtec_ad_dataset
from anomalib.data.utils import Split, TestSplitMode, ValSplitMode
from lightning.pytorch.trainer.states import TrainerFn
from pandas import DataFrame
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import Transform

#: Where MVTec AD is published; it needs a registration form, so we never download it ourselves.
MVTEC_AD_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
#: Name used for the results folder when all categories are trained together.
ALL_CATEGORIES_NAME = "multiclass"
#: Image files read, in lower and upper case (anomalib's ``MVTecADDataset`` reads ``.png`` only).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Masks must be lossless: anomalib reads a mask as ``pixel > 0``, so JPEG noise would mark background
#: pixels as defect.
MASK_SUFFIXES = (".png",)
#: MVTec AD layout: the label folder of defect-free images, and the folders of the splits and masks.
NORMAL_LABEL = "good"
TRAIN_DIR = "train"
TEST_DIR = "test"
MASKS_DIR = "ground_truth"
#: PIL modes of one-channel images deeper than 8 bits. anomalib's ``read_image`` converts with
#: ``Image.convert("RGB")``, which clips them: a 16-bit grey PNG would be read as almost all white.
#: (16-bit RGB PNGs open as 8-bit RGB and are read correctly.)
DEEP_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
#: The EXIF orientation tag, and its values that swap width and height (rotations by 90 or 270 degrees).
EXIF_ORIENTATION_TAG = 0x0112
EXIF_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})


class MVTecDatasetNotFoundError(FileNotFoundError):
    """MVTec AD, a requested category, or a folder or file the layout needs is not under ``root``."""


class MVTecDataError(ValueError):
    """A file under ``root`` is there but cannot be used as it is (unreadable, 16-bit grey, bad mask)."""


def _any_case(suffixes: Sequence[str]) -> tuple[str, ...]:
    # make_mvtec_ad_dataset compares suffixes case-sensitively
    return tuple(s for suffix in suffixes for s in (suffix.lower(), suffix.upper()))


def _evaluates(stage: str | None) -> bool:
    # setup() without a Trainer (stage None) checks as for fitting, which also validates
    return stage in (None, TrainerFn.FITTING, TrainerFn.VALIDATING, TrainerFn.TESTING)


def _subfolders(folder: Path) -> list[Path]:
    return [d for d in folder.iterdir() if d.is_dir()] if folder.is_dir() else []


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    suffixes = _any_case(IMAGE_SUFFIXES)
    return sorted(p for p in folder.iterdir() if p.suffix in suffixes and p.is_file())


class MVTecCategoryDataset(AnomalibDataset):
    """One category in MVTec AD layout, as anomalib's ``MVTecADDataset`` but with JPEG images too.

    The samples come from anomalib's own :func:`make_mvtec_ad_dataset`, whose ``extensions`` argument
    ``MVTecADDataset`` fixes to PNG; everything else (reading, masks, batches) is anomalib's.

    Args:
        root: folder holding the category folder.
        category: the category's folder name.
        split: ``train`` or ``test``.
        augmentations: as anomalib's datasets.
    """

    def __init__(
        self, root: Path, category: str, split: Split, augmentations: Transform | None = None
    ) -> None:
        super().__init__(augmentations=augmentations)
        self.root_category = Path(root) / category
        self.category = category
        self.split = split
        self.samples = make_mvtec_ad_dataset(
            self.root_category, split=split, extensions=_any_case(IMAGE_SUFFIXES)
        )


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

    Images may be PNG or JPEG; masks must be PNG. Images of different sizes are fine (the model's
    pre-processor resizes them). anomalib reads pixels as stored: an EXIF orientation tag is ignored.

    Raises:
        MVTecDatasetNotFoundError: in ``prepare_data``/``setup`` when ``root`` or a category is
            missing (the message names the official download page; no download is attempted), or a
            category lacks ``ground_truth/`` masks, training images (when fitting) or defect test
            images (when the test split comes from the folders), or only some categories have good
            test images.
        MVTecDataError: in ``setup`` for a file that cannot be used as it is.
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
        if self.root.is_file():
            where = "is a file, not a folder"
        elif not self.root.is_dir():
            where = "does not exist"
        else:
            where = f"lacks the categories {missing}"
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

    def _check_layout(self, category: str, stage: str | None) -> None:
        """Refuse, before anomalib parses the folders, what it would fail on late or get silently wrong."""
        folder = self.root / category
        suffixes = "/".join(IMAGE_SUFFIXES)
        test_dir = folder / TEST_DIR
        masks_root = folder / MASKS_DIR
        # anomalib pairs the sorted masks with the sorted defect images of the whole category, so a
        # missing or extra mask anywhere fails there with a pandas length error: count per defect.
        defects = sorted(
            {d.name for d in _subfolders(test_dir) if d.name != NORMAL_LABEL}
            | {d.name for d in _subfolders(masks_root)}
        )
        defect_images = 0
        for defect in defects:
            images, masks = _images_in(test_dir / defect), _images_in(masks_root / defect)
            defect_images += len(images)
            lossy = [m.name for m in masks if m.suffix.lower() not in MASK_SUFFIXES]
            if lossy:
                msg = (
                    f"Masks in {str(masks_root / defect)!r} must be PNG, got {lossy[:3]}: anomalib reads a mask as "
                    "pixel > 0, so JPEG compression noise would mark background as defect. Save the masks as PNG."
                )
                raise MVTecDataError(msg)
            if len(masks) != len(images):
                where = (
                    f"{str(masks_root / defect)!r} holds {len(masks)}"
                    if masks_root.is_dir()
                    else f"there is no {MASKS_DIR!r} folder in {str(folder)!r}, so 0"
                )
                fix = (
                    "Add the missing masks"
                    if len(masks) < len(images)
                    else "Remove the masks without an image"
                )
                msg = (
                    f"Category {category!r} has {len(images)} defect images in {str(test_dir / defect)!r} but {where} "
                    f"masks. MVTec AD layout needs one mask per defect image: {MASKS_DIR}/{defect}/<image>_mask.png "
                    f"(white = defect). {fix}; for image-level labels only, use anomalib's Folder datamodule "
                    "without mask_dir (`--data Folder`)."
                )
                raise MVTecDatasetNotFoundError(msg)
        if stage in (None, TrainerFn.FITTING) and not _images_in(folder / TRAIN_DIR / NORMAL_LABEL):
            msg = (
                f"Category {category!r} has no training images: {str(folder / TRAIN_DIR / NORMAL_LABEL)!r} holds no "
                f"{suffixes} files. Put the defect-free images there, or drop the category from `--data.categories`."
            )
            raise MVTecDatasetNotFoundError(msg)
        if _evaluates(stage) and self.test_split_mode == TestSplitMode.FROM_DIR and not defect_images:
            msg = (
                f"Category {category!r} has no defect images: {str(test_dir)!r} holds no <defect>/ folder with "
                f"{suffixes} files, so its image and pixel metrics would be 0 or undefined. Add defect images in "
                f"{TEST_DIR}/<defect>/ with masks in {MASKS_DIR}/<defect>/, or evaluate on generated anomalies "
                "with `--data.test_split_mode synthetic`."
            )
            raise MVTecDatasetNotFoundError(msg)

    def _check_good_test_images(self, stage: str | None) -> None:
        """anomalib moves normal images from train to test only when NO category has test/good images."""
        if not _evaluates(stage) or self.test_split_mode != TestSplitMode.FROM_DIR:
            return
        lacking = [c for c in self.categories if not _images_in(self.root / c / TEST_DIR / NORMAL_LABEL)]
        if lacking and len(lacking) < len(self.categories):
            msg = (
                f"Categories {lacking} have no good test images in {TEST_DIR}/{NORMAL_LABEL}/ while the others do, so "
                "their image metrics would be undefined (anomalib borrows normal test images from train/ only "
                f"when no category has any). Add defect-free images to {TEST_DIR}/{NORMAL_LABEL}/ of each."
            )
            raise MVTecDatasetNotFoundError(msg)

    @staticmethod
    def _check_files(samples: DataFrame) -> None:
        """Open every image's and mask's header (not the pixels): cheap, and it fails here, not mid-epoch."""
        for row in samples.itertuples():
            size = _header_size(Path(row.image_path), image=True)
            if not row.mask_path:
                continue
            mask_size = _header_size(Path(row.mask_path), image=False)
            if mask_size != size:
                msg = (
                    f"Mask {row.mask_path!r} is {mask_size[0]}x{mask_size[1]} (width x height) but its image "
                    f"{row.image_path!r} is {size[0]}x{size[1]}; they must match pixel for pixel."
                )
                with Image.open(row.image_path) as file:
                    rotated = file.getexif().get(EXIF_ORIENTATION_TAG) in EXIF_TRANSPOSING_ORIENTATIONS
                if rotated:
                    msg += (
                        " The image carries an EXIF rotation, which anomalib ignores (it reads pixels as "
                        "stored): save it rotated, e.g. `PIL.ImageOps.exif_transpose(image).save(path)`."
                    )
                raise MVTecDataError(msg)

    def _split(self, split: Split) -> MVTecCategoryDataset:
        dataset = None
        for category in self.categories:
            part = MVTecCategoryDataset(root=self.root, category=category, split=split)
            self._check_files(part.samples)
            samples = part.samples.copy()
            samples["category"] = category
            samples.attrs.update(part.samples.attrs)
            part.samples = samples
            dataset = part if dataset is None else dataset + part
        assert dataset is not None  # categories is non-empty (checked in __init__)
        dataset.samples.attrs.update(part.samples.attrs)
        dataset.category = self.category
        return dataset

    def _setup(self, stage: str | None = None) -> None:
        self._check_root()
        for category in self.categories:
            self._check_layout(category, stage)
        self._check_good_test_images(stage)
        self.train_data = self._split(Split.TRAIN)
        self.test_data = self._split(Split.TEST)


def _header_size(path: Path, image: bool) -> tuple[int, int]:
    """``(width, height)`` of ``path`` from its header, or one error naming the file and the fix.

    Raises:
        MVTecDataError: the file cannot be opened, is no image PIL knows, or (``image=True``) is a
            grey image deeper than 8 bits.
    """
    try:
        with Image.open(path) as file:
            if image and file.mode in DEEP_GREY_MODES:
                msg = (
                    f"Image {str(path)!r} is a single-channel image deeper than 8 bits (PIL mode {file.mode!r}): "
                    "anomalib reads images as 8-bit RGB and would clip it to white. Convert it to 8 bits first, "
                    "e.g. `Image.fromarray((np.asarray(image) >> 8).astype(np.uint8)).save(path)` for 16-bit PNGs "
                    "(ImageMagick: `mogrify -depth 8 *.png`)."
                )
                raise MVTecDataError(msg)
            return file.size
    except PermissionError as exc:
        msg = f"Cannot read {str(path)!r}: permission denied. Make it readable for this user, e.g. `chmod a+r <file>`."
        raise MVTecDataError(msg) from exc
    except (UnidentifiedImageError, OSError) as exc:
        msg = f"Cannot read {str(path)!r} as an image ({exc}); the file is corrupt or not an image. Replace or remove it."
        raise MVTecDataError(msg) from exc
