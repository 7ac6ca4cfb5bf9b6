# From-scratch schedule for small training sets (a few hundred images: NEU-CLS's paper split of 228,
# Aluminum's 277). The recipe of memorymamba_scratch.py, but counted so that training gets ~1,200
# optimiser steps: at batch 32 such a set gives 8-9 iterations an epoch, and 30 epochs (~250 steps)
# leave MemoryMamba underfitted (bench/memory_mamba_neu.py, imbalanced NEU: macro-F1 0.45 after 300
# steps, 0.86 after 1,200). Warm-up keeps its length in iterations (~80).
_base_ = ["./memorymamba_scratch.py"]

max_epochs = 150
warmup_epochs = 10

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
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
