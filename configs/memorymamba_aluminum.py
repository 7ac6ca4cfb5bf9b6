# MemoryMamba-tiny on Aluminum (4 classes; paper split 277 / 123) with the paper's schedule.
#   mim train mmpretrain configs/memorymamba_aluminum.py
# Data: python tools/prepare_dataset.py aluminum SRC data/aluminum  (or point the roots elsewhere with
# --cfg-options train_dataloader.dataset.data_root=... val_dataloader.dataset.data_root=...
#   test_dataloader.dataset.data_root=...)
_base_ = [
    "./_base_/models/memorymamba_tiny.py",
    "./_base_/datasets/defect_folder.py",
    "./_base_/schedules/memorymamba_paper.py",
    "./_base_/memorymamba_runtime.py",
]

num_classes = 4
data_root = "data/aluminum"

model = dict(head=dict(num_classes=num_classes))
data_preprocessor = dict(num_classes=num_classes)
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
