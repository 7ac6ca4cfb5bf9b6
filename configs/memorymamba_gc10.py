# MemoryMamba-tiny on GC10-DET (10 classes; paper split 1,834 / 458) with the paper's schedule.
#   mim train mmpretrain configs/memorymamba_gc10.py
# Data: python tools/prepare_dataset.py gc10 SRC data/gc10  (or point the roots elsewhere with
# --cfg-options train_dataloader.dataset.data_root=... val_dataloader.dataset.data_root=...
#   test_dataloader.dataset.data_root=...)
_base_ = [
    "./_base_/models/memorymamba_tiny.py",
    "./_base_/datasets/defect_folder.py",
    "./_base_/schedules/memorymamba_paper.py",
    "./_base_/memorymamba_runtime.py",
]

num_classes = 10
data_root = "data/gc10"

model = dict(head=dict(num_classes=num_classes))
data_preprocessor = dict(num_classes=num_classes)
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
