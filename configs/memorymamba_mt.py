# MemoryMamba-tiny on Magnetic-tile MT (6 classes; paper split 1,878 / 810) with the paper's schedule.
#   mim train mmpretrain configs/memorymamba_mt.py
# Data: python tools/prepare_dataset.py mt SRC data/mt  (or point the roots elsewhere with
# --cfg-options train_dataloader.dataset.data_root=... val_dataloader.dataset.data_root=...
#   test_dataloader.dataset.data_root=...)
_base_ = [
    "./_base_/models/memorymamba_tiny.py",
    "./_base_/datasets/defect_folder.py",
    "./_base_/schedules/memorymamba_paper.py",
    "./_base_/memorymamba_runtime.py",
]

num_classes = 6
data_root = "data/mt"

model = dict(head=dict(num_classes=num_classes))
data_preprocessor = dict(num_classes=num_classes)
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
