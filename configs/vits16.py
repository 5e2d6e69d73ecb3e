"""ViT-S/16 on ImageNet-1k with the matching gap: the vitb16.py recipe with a smaller backbone.

    python -m matching_gap.main --config=configs/vits16.py --workdir=DIR \
        --config.data.data_dir=/path/to/tensorflow_datasets

Same recipe as ``configs/vitb16.py`` (DINO uses the same schedule for ViT-S/16), with DINO's
ViT-S probe features (the CLS tokens of the last 4 blocks); variants ``:strong`` and ``:smoke``.
"""

from matching_gap import config_lib


def get_config(arg: str | None = None):
    words = config_lib.parse_arg(arg, ("smoke", "strong"))
    c = config_lib.imagenet_recipe("S/16")
    # DINO's eval_linear.py for ViT-S: the CLS tokens of the last 4 blocks (n_last_blocks=4,
    # avgpool_patchtokens=False); the k-NN stays on the last CLS token.
    c.eval.features = "last4_cls"
    if "strong" in words:
        config_lib.strong_augmentations(c)
    if "smoke" in words:
        config_lib.make_smoke(c)
    return config_lib.finalize(c)
