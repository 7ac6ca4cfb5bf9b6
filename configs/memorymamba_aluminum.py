# MemoryMamba-tiny on Aluminum (4 classes; paper split 277 / 123) with the paper's schedule.
#   mim train mmpretrain configs/memorymamba_aluminum.py
# Data: python tools/prepare_dataset.py aluminum SRC data/aluminum  (or point the roots elsewhere with
# --cfg-options train_dataloader.dataset.data_root=... val_dataloader.dataset.data_root=...
#   test_dataloader.dataset.data_root=...)
_base_ = [
    "./_base_/models/memorymamba_tiny.py",
    "./_base_/datasets/defect_folder.py",
    "./_base_/schedules/memorymamba_paper.py",
    "mmpretrain::_base_/default_runtime.py",
]
custom_imports = dict(imports=["memmamba_plugins.memory_mamba"], allow_failed_imports=False)

num_classes = 4
data_root = "data/aluminum"

model = dict(head=dict(num_classes=num_classes))
data_preprocessor = dict(num_classes=num_classes)
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader

default_hooks = dict(
    logger=dict(type="LoggerHook", interval=10),
    checkpoint=dict(type="CheckpointHook", interval=1, max_keep_ckpts=2, save_best="accuracy/top1"),
)
randomness = dict(seed=0, deterministic=False)
