"""Training (needs the [train] extra: torch). Public names load on first use, so `huse-train --help`
works without torch.

    from huse.train import HuseConfig, TrainConfig, Trainer, load_catalog_dataset
"""

from huse.runtime._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "huse.train.config": ["HuseConfig", "TrainConfig"],
    "huse.train.model": ["HUSE", "build_model"],
    "huse.train.trainer": ["Trainer", "backbone_features", "load_run"],
    "huse.train.data": ["Dataset", "load_builtin", "load_catalog_dataset", "load_source"],
    "huse.train.backbones": ["backbone_info", "create_backbone", "list_backbones", "register"],
})
