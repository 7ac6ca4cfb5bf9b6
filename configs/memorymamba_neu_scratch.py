# MemoryMamba-tiny on NEU-CLS from random weights (no VMamba checkpoint needed).
#   mim train mmpretrain configs/memorymamba_neu_scratch.py
# Recipe measured in bench/memory_mamba_neu.py (see docs/memory_mamba.md). Data as configs/memorymamba_neu.py.
_base_ = [
    "./_base_/models/memorymamba_tiny.py",
    "./_base_/datasets/defect_folder_scratch.py",
    "./_base_/schedules/memorymamba_scratch.py",
    "./_base_/memorymamba_runtime.py",
]

num_classes = 6
data_root = "data/neu"

model = dict(
    backbone=dict(drop_path_rate=0.1),
    head=dict(num_classes=num_classes, loss=dict(type="LabelSmoothLoss", label_smooth_val=0.1)),
)
data_preprocessor = dict(num_classes=num_classes)
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
