# MemoryMamba-tiny for training from random weights: lighter stochastic depth (0.1) and label
# smoothing 0.1, as measured in bench/memory_mamba_neu.py.
_base_ = ["./memorymamba_tiny.py"]
model = dict(
    backbone=dict(drop_path_rate=0.1),
    head=dict(loss=dict(type="LabelSmoothLoss", label_smooth_val=0.1, _delete_=True)),
)
