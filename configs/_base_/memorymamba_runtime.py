# Runtime shared by the MemoryMamba configs: mmpretrain's default runtime, the plugin import,
# per-epoch checkpoints (the last is kept as `last_checkpoint`) and a fixed seed. The schedules add
# the start-of-run checks (`custom_hooks`).
_base_ = ["mmpretrain::_base_/default_runtime.py"]
custom_imports = dict(imports=["memmamba_plugins.memory_mamba"], allow_failed_imports=False)

default_hooks = dict(
    logger=dict(type="LoggerHook", interval=10),
    # No `save_best`: the val split is also the reported test split here, and picking the epoch on it
    # would report a selected, optimistic score. Hold a validation split out of train to select on it.
    checkpoint=dict(type="CheckpointHook", interval=1, max_keep_ckpts=2, save_last=True),
)
randomness = dict(seed=0, deterministic=False)
