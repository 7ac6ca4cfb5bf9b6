# MemoryMamba-tiny on Magnetic-tile MT (6 classes) from random weights: no VMamba checkpoint needed.
#   mim train mmpretrain configs/memorymamba_mt_scratch.py
# The recipe (augmentation, AdamW + warm-up + cosine, label smoothing) is measured on NEU-CLS in
# bench/memory_mamba_neu.py; see docs/memory_mamba.md. Data as configs/memorymamba_mt.py.
_base_ = [
    "./_base_/models/memorymamba_tiny_scratch.py",
    "./_base_/datasets/defect_folder_scratch.py",
    "./_base_/schedules/memorymamba_scratch.py",
    "./_base_/memorymamba_runtime.py",
]

num_classes = 6
data_root = "data/mt"

model = dict(head=dict(num_classes=num_classes))
data_preprocessor = dict(num_classes=num_classes)
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader

# MT is imbalanced (952 of 1,344 images defect-free). For class-balanced sampling wrap the training
# set in mmpretrain's ClassBalancedDataset (see docs/memory_mamba.md, "Imbalanced data"):
# train_dataloader = dict(dataset=dict(_delete_=True, type="ClassBalancedDataset", oversample_thr=1 / 6,
#                                      dataset=dict(type="DefectFolderDataset", data_root=data_root,
#                                                   data_prefix="train", pipeline={{_base_.train_pipeline}})))
