"""MemoryMamba for mmpretrain: backbone, head, losses, classifier and dataset, registered on import.

Reference: MemoryMamba: Memory-Augmented State Space Model for Defect Recognition.
Load it from a config with
``custom_imports = dict(imports=['memmamba_plugins.memory_mamba'], allow_failed_imports=False)``.

Importing it also registers :func:`~.checkpoint.load_from_local_checked` as mmengine's loader of local
checkpoint files (``allow_mmengine_checkpoints``), so ``load_from`` / ``--resume`` / ``mim test
--checkpoint`` read mmengine checkpoints under ``weights_only``; torch's own allow-list is left alone.
"""

from .backbone import ARCH_SETTINGS, MemoryMamba, MemSSMBlock
from .checkpoint import (
    CorruptCheckpointError,
    LoadReport,
    PartialCheckpointError,
    UnsafeCheckpointError,
    allow_mmengine_checkpoints,
    load_vmamba_pretrained,
)
from .classifier import MemoryMambaClassifier, NonFiniteLossError
from .compat import CPUDistributedRunner, mmengine_safe_globals
from .datasets import DefectFolderDataset
from .head import MemoryMambaClsHead
from .hooks import ClassListCheckHook, PretrainedRequiredHook
from .losses import MemoryContrastiveLoss, MemoryInfoNCELoss
from .memory import FUSIONS, SIMILARITIES, MemoryBank, MemoryState, MemSS2D, similarity

__all__ = [
    "ARCH_SETTINGS",
    "CPUDistributedRunner",
    "ClassListCheckHook",
    "CorruptCheckpointError",
    "FUSIONS",
    "SIMILARITIES",
    "DefectFolderDataset",
    "LoadReport",
    "MemSS2D",
    "MemSSMBlock",
    "MemoryBank",
    "MemoryContrastiveLoss",
    "MemoryInfoNCELoss",
    "MemoryMamba",
    "MemoryMambaClassifier",
    "MemoryMambaClsHead",
    "MemoryState",
    "NonFiniteLossError",
    "PartialCheckpointError",
    "PretrainedRequiredHook",
    "UnsafeCheckpointError",
    "allow_mmengine_checkpoints",
    "load_vmamba_pretrained",
    "mmengine_safe_globals",
    "similarity",
]

allow_mmengine_checkpoints()
