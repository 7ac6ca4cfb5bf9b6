"""MemoryMamba for mmpretrain: backbone, head, losses, classifier and dataset, registered on import.

Reference: MemoryMamba: Memory-Augmented State Space Model for Defect Recognition.
Load it from a config with
``custom_imports = dict(imports=['memmamba_plugins.memory_mamba'], allow_failed_imports=False)``.
"""

from .backbone import ARCH_SETTINGS, MemoryMamba, MemSSMBlock
from .checkpoint import LoadReport, load_vmamba_pretrained
from .classifier import MemoryMambaClassifier
from .compat import CPUDistributedRunner, allow_mmengine_checkpoints
from .datasets import DefectFolderDataset
from .head import MemoryMambaClsHead
from .hooks import ClassListCheckHook, PretrainedRequiredHook
from .losses import MemoryContrastiveLoss, MemoryInfoNCELoss
from .memory import FUSIONS, SIMILARITIES, MemoryBank, MemoryState, MemSS2D, similarity

__all__ = [
    "ARCH_SETTINGS",
    "CPUDistributedRunner",
    "ClassListCheckHook",
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
    "PretrainedRequiredHook",
    "allow_mmengine_checkpoints",
    "load_vmamba_pretrained",
    "similarity",
]

allow_mmengine_checkpoints()
