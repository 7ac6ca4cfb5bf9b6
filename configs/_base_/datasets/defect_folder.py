# Class-folder defect datasets (<data_root>/{train,val}/<class>/*.jpg), as produced by
# tools/prepare_dataset.py. Override the root with
#   --cfg-options train_dataloader.dataset.data_root=DIR val_dataloader.dataset.data_root=DIR \
#                 test_dataloader.dataset.data_root=DIR
dataset_type = 'DefectFolderDataset'
data_root = 'data/defects'
img_size = 224

data_preprocessor = dict(
    num_classes=1000,
    # ImageNet statistics: the paper's schedule fine-tunes ImageNet-pretrained weights.
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    to_rgb=True,  # grey images are loaded as 3 identical channels
)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(img_size, img_size)),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(img_size, img_size)),
    dict(type='PackInputs'),
]

train_dataloader = dict(
    batch_size=64,
    num_workers=2,
    persistent_workers=True,  # only valid with num_workers > 0: set both when overriding
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, data_prefix='train', pipeline=train_pipeline),
)
val_dataloader = dict(
    batch_size=64,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, data_prefix='val', pipeline=test_pipeline),
)
test_dataloader = val_dataloader

# ACC + macro precision / recall / F1: the paper's four metrics.
val_evaluator = [dict(type='Accuracy', topk=(1, )), dict(type='SingleLabelMetric', average='macro')]
test_evaluator = val_evaluator
