"""A ``CustomDataset`` over class folders whose class list cannot shift between splits.

mmpretrain's ``CustomDataset`` numbers the class folders it finds in each split on its own, so a
class missing from ``val`` silently shifts every later label there. :class:`DefectFolderDataset`
numbers every split by one class list: the config's ``classes`` if given, else the class folders of
the training split (``class_split``). In that split every class must have an image: an empty class
folder (or one holding only files without an image extension, which ``CustomDataset`` skips) would
train a class the model never sees.
"""

from __future__ import annotations

import os
import os.path as osp

from mmengine.logging import MMLogger
from mmpretrain.datasets import CustomDataset
from mmpretrain.datasets.custom import get_samples
from mmpretrain.registry import DATASETS

#: The split whose class folders define the class list when the config gives none.
DEFAULT_CLASS_SPLIT = "train"


def class_folders(folder: str) -> list[str]:
    """Sorted names of the sub-folders of ``folder`` (hidden ones skipped)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


@DATASETS.register_module()
class DefectFolderDataset(CustomDataset):
    """``CustomDataset`` over ``<data_root>/<data_prefix>/<class>/*.jpg`` with one class list for all splits.

    Args:
        data_root: dataset root holding the split folders.
        data_prefix: the split folder (e.g. ``"train"``, ``"val"``) or ``dict(img_path=...)``.
        classes: the class names in label order; ``None`` takes the class folders of
            ``<data_root>/<class_split>`` (sorted), so train, val and test agree.
        class_split: the split that defines the class list when ``classes`` is ``None``.
        **kwargs: ``CustomDataset``'s other arguments (``ann_file``, ``pipeline``, ...).

    Raises:
        FileNotFoundError: the split folder does not exist (with how to build it).
        NotADirectoryError: ``data_root`` or the split is a file (e.g. an archive), not a folder.
        ValueError: a split has a class folder that is not in the class list, or a class of the list has
            no image in the ``class_split`` split.
    """

    def __init__(
        self,
        data_root: str = "",
        data_prefix: str | dict = "",
        classes: list[str] | tuple[str, ...] | str | None = None,
        class_split: str = DEFAULT_CLASS_SPLIT,
        **kwargs,
    ) -> None:
        prefix = data_prefix.get("img_path", "") if isinstance(data_prefix, dict) else data_prefix
        folder = osp.join(data_root, prefix) if data_root else prefix
        for path in (data_root, folder):
            if path and osp.isfile(path) and not kwargs.get("ann_file"):
                raise NotADirectoryError(
                    f"{osp.abspath(path)!r} is a file, not a folder. data_root must be the folder holding the "
                    "split folders (train/<class>/*.jpg, val/<class>/*.jpg): extract an archive first, or "
                    "build the folder with `python tools/prepare_dataset.py {gc10,neu,mt,aluminum} SRC DST`."
                )
        if not kwargs.get("ann_file") and not osp.isdir(folder):
            raise FileNotFoundError(
                f"Dataset folder {osp.abspath(folder)!r} does not exist. Build it with "
                "`python tools/prepare_dataset.py {gc10,neu,mt,aluminum} SRC DST` (class sub-folders under "
                "DST/train and DST/val), or point the config at your copy, e.g. `--cfg-options "
                "train_dataloader.dataset.data_root=DST val_dataloader.dataset.data_root=DST "
                "test_dataloader.dataset.data_root=DST`."
            )
        reference = osp.join(data_root, class_split) if data_root else ""
        has_reference = osp.isdir(reference)
        # The split that defines the class list must show every class: the class_split itself, or this
        # split when its own folders are the class list.
        self.defines_classes = osp.isdir(folder) and (
            osp.samefile(reference, folder) if has_reference else classes is None
        )
        if classes is None and not kwargs.get("ann_file") and kwargs.get("with_label", True):
            classes = class_folders(reference if has_reference else folder)
        super().__init__(data_root=data_root, data_prefix=data_prefix, classes=classes, **kwargs)

    def _find_samples(self) -> list[tuple[str, int]]:
        """Samples of this split, labelled by the fixed class list (a missing class is allowed)."""
        if not self.with_label:
            return super()._find_samples()
        classes = list(self.CLASSES)
        present = class_folders(self.img_prefix)
        unknown = [name for name in present if name not in classes]
        if unknown:
            raise ValueError(
                f"{self.img_prefix!r} has class folders {unknown} that are not in the class list {classes} "
                "(taken from the config's `classes` or the training split). Rename or remove them, or list "
                "every class in `classes`."
            )
        folder_to_idx = {name: classes.index(name) for name in present}
        samples, empty = get_samples(self.img_prefix, folder_to_idx, is_valid_file=self.is_valid_file)
        if not samples:
            raise RuntimeError(
                f"Found no image in the class folders of {self.img_prefix!r}; "
                f"supported extensions are {', '.join(self.extensions)}."
            )
        missing = sorted(set(classes) - set(present)) + sorted(empty or ())
        if missing and self.defines_classes:
            raise ValueError(self._no_image_message(missing))
        if missing:
            MMLogger.get_current_instance().warning(
                f"{self.img_prefix!r} has no image of class(es) {missing}; the other labels are unchanged."
            )
        self.folder_to_idx = folder_to_idx
        return samples

    def _no_image_message(self, missing: list[str]) -> str:
        skipped = []
        for name in missing:
            for _, _, files in os.walk(osp.join(self.img_prefix, name)):
                skipped += [f for f in files if not self.is_valid_file(f)]
        note = (
            f" ({len(skipped)} file(s) without an image extension were skipped, e.g. {skipped[0]!r})"
            if skipped
            else ""
        )
        return (
            f"{self.img_prefix!r} defines the class list, but class(es) {missing} have no image there{note}; "
            f"supported extensions are {', '.join(sorted(self.extensions))}. Add images to those class folders, "
            "convert them to a supported format, or remove the folders (or drop them from `classes`)."
        )
