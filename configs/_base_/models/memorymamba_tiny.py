# MemoryMamba-tiny classifier (official MemoryMamba tiny: depths 2/2/5/2, dim 96, ssm_ratio 2).
# MemoryMambaClassifier = mmpretrain's ImageClassifier that also hands the backbone's memory
# states to the head, so the head can add the coarse / fine memory losses (paper Eq. 25).
model = dict(
    type="MemoryMambaClassifier",
    backbone=dict(
        type="MemoryMamba",
        arch="tiny",
        drop_path_rate=0.2,
        coarse_slots=12,  # c, coarse memory size (0 = "w/o CMN")
        fine_slots=12,  # f, fine memory size (0 = "w/o FMN")
        use_fusion=True,  # False = "w/o Fusion"
        similarity="cosine",  # 'cosine' | 'l1' | 'l2'
        init_cfg=None,  # dict(type='Pretrained', checkpoint='vssm_tiny.pth') for VMamba weights
    ),
    neck=dict(type="GlobalAveragePooling"),
    head=dict(
        type="MemoryMambaClsHead",
        num_classes=1000,
        in_channels=None,  # follows the arch (768 for tiny / small, 1024 for base)
        hidden_channels=None,  # an int gives the MLP head of Eq. 5 (e.g. 512); None = linear
        loss=dict(type="CrossEntropyLoss", loss_weight=1.0),
        coarse_loss=dict(type="MemoryContrastiveLoss", margin=0.5, loss_weight=0.1),  # delta, lambda_c
        fine_loss=dict(type="MemoryInfoNCELoss", temperature=0.5, loss_weight=0.05),  # tau, lambda_f
        topk=(1,),
    ),
)
