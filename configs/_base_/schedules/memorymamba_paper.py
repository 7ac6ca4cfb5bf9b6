# The paper's schedule (Sec. 5.2): Adam, lr 2e-5, weight decay 0.01, 10 epochs, linear decay
# after a 5 % linear warm-up, batch 64 (set in the dataset file).
max_epochs = 10
warmup_epochs = 0.05 * max_epochs

optim_wrapper = dict(optimizer=dict(type="Adam", lr=2e-5, weight_decay=0.01))
param_scheduler = [
    dict(
        type="LinearLR",
        start_factor=1e-3,
        end_factor=1.0,
        by_epoch=True,
        begin=0,
        end=warmup_epochs,
        convert_to_iter_based=True,
    ),
    dict(
        type="LinearLR",
        start_factor=1.0,
        end_factor=0.0,
        by_epoch=True,
        begin=warmup_epochs,
        end=max_epochs,
        convert_to_iter_based=True,
    ),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
val_cfg = dict()
test_cfg = dict()
# lr is for a total batch of 64; enable with `--auto-scale-lr` when training on another batch.
auto_scale_lr = dict(base_batch_size=64)
# Check at start that every split has the head's class list, and (a fine-tuning schedule) warn when
# the backbone has no pretrained checkpoint.
custom_hooks = [dict(type="ClassListCheckHook"), dict(type="PretrainedRequiredHook")]
