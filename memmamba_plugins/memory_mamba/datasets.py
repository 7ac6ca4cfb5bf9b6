"""A ``CustomDataset`` that fails early, with instructions, when its folder is missing."""

from __future__ import annotations

import os.path as osp

from mmpretrain.datasets import CustomDataset
from mmpretrain.registry import DATASETS


@DATASETS.register_module()
class DefectFolderDataset(CustomDataset):
    """``CustomDataset`` over ``<data_root>/<data_prefix>/<class>/*.jpg``, checking the folder exists.

    Without the check a missing root surfaces deep inside mmengine as an empty or confusing error;
    here it names the path and how to produce it (``tools/prepare_dataset.py``) or point the
    config elsewhere (``--cfg-options``). Arguments are ``CustomDataset``'s.
    """

    def __init__(self, data_root: str = "", data_prefix: str | dict = "", **kwargs) -> None:
        prefix = data_prefix.get("img_path", "") if isinstance(data_prefix, dict) else data_prefix
        folder = osp.join(data_root, prefix) if data_root else prefix
        if not kwargs.get("ann_file") and not osp.isdir(folder):
            raise FileNotFoundError(
                f"Dataset folder {osp.abspath(folder)!r} does not exist. Build it with "
                "`python tools/prepare_dataset.py {gc10,neu,mt,aluminum} SRC DST` (class sub-folders under "
                "DST/train and DST/val), or point the config at your copy, e.g. `--cfg-options "
                "train_dataloader.dataset.data_root=DST val_dataloader.dataset.data_root=DST "
                "test_dataloader.dataset.data_root=DST`."
            )
        super().__init__(data_root=data_root, data_prefix=data_prefix, **kwargs)
