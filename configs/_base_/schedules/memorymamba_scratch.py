# From-scratch schedule for MemoryMamba (no ImageNet checkpoint): AdamW, lr 1e-3 for a batch of 32,
# weight decay 0.05, linear warm-up for 2 epochs, then cosine annealing to 0; label smoothing 0.1 is
# set in the recipe configs (the head's loss). Measured on NEU-CLS in bench/memory_mamba_neu.py.
max_epochs = 30
warmup_epochs = 2

optim_wrapper = dict(
    optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999)),
    # no decay on norms, biases and the scan's A / D (mmengine's own switches)
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        custom_keys={"A_logs": dict(decay_mult=0.0), "Ds": dict(decay_mult=0.0)},
    ),
)
param_scheduler = [
    dict(
        type="LinearLR",
        start_factor=1e-3,
        by_epoch=True,
        begin=0,
        end=warmup_epochs,
        convert_to_iter_based=True,
    ),
    dict(
        type="CosineAnnealingLR",
        eta_min=0.0,
        by_epoch=True,
        begin=warmup_epochs,
        end=max_epochs,
        convert_to_iter_based=True,
    ),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=32)
# Check at start that every split has the head's class list.
custom_hooks = [dict(type="ClassListCheckHook")]
