"""The CPU demo: a small ViT trained with the matching gap on Fashion-MNIST, crop + flip.

    python -m matching_gap.main --config=configs/default.py --workdir=/tmp/mg_default

Data: the IDX files of the Debian package ``dataset-fashion-mnist``
(``apt-get install dataset-fashion-mnist``), or ``--config.data.data_dir=DIR``.
Variants: ``configs/default.py:smoke`` (3 steps of TFDS fashion_mnist: the tests run it on
``tfds.testing.mock_data``),
``:info_nce``, ``:byol`` (same model and budget, the baselines).
"""

from matching_gap import config_lib


def get_config(arg: str | None = None):
    words = config_lib.parse_arg(arg, ("smoke", "info_nce", "byol"))
    c = config_lib.base_config()
    if "info_nce" in words:
        c.loss.name = "info_nce"
    if "byol" in words:
        c.loss.name = "byol"
        c.teacher.ema = True
        c.model.use_predictor = True
    if "smoke" in words:
        config_lib.make_smoke(c, image_size=28)
        c.data.name = "fashion_mnist"
        c.model.patch_size = 7
    return config_lib.finalize(c)
