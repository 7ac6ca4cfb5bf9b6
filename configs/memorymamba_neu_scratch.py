# MemoryMamba-tiny on NEU-CLS (6 classes) from random weights: no VMamba checkpoint needed.
#   mim train mmpretrain configs/memorymamba_neu_scratch.py
# The recipe (augmentation, AdamW + warm-up + cosine, label smoothing) is measured on NEU-CLS in
# bench/memory_mamba_neu.py; see docs/memory_mamba.md. Data as configs/memorymamba_neu.py.
_base_ = [
    "./_base_/models/memorymamba_tiny_scratch.py",
    "./_base_/datasets/defect_folder_scratch.py",
    "./_base_/schedules/memorymamba_scratch_small.py",
    "./_base_/memorymamba_runtime.py",
]

num_classes = 6
data_root = "data/neu"

model = dict(head=dict(num_classes=num_classes))
data_preprocessor = dict(num_classes=num_classes)
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
# ~8 iterations an epoch: a checkpoint every 10 epochs is enough to resume from
default_hooks = dict(checkpoint=dict(interval=10))
