# Runtime shared by the MemoryMamba configs: mmpretrain's default runtime, the plugin import,
# per-epoch checkpoints keeping the best top-1, a fixed seed.
_base_ = ["mmpretrain::_base_/default_runtime.py"]
custom_imports = dict(imports=["memmamba_plugins.memory_mamba"], allow_failed_imports=False)

default_hooks = dict(
    logger=dict(type="LoggerHook", interval=10),
    checkpoint=dict(type="CheckpointHook", interval=1, max_keep_ckpts=2, save_best="accuracy/top1"),
)
randomness = dict(seed=0, deterministic=False)
