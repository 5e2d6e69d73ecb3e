"""Every config and variant loads, is locked, and is self-consistent."""

import glob
import os

import pytest

from matching_gap import config_lib

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")

VARIANTS = {
    "default.py": ["", "smoke", "info_nce", "byol", "smoke,info_nce", "smoke,byol"],
    "vitb16.py": ["", "smoke", "strong", "strong,smoke"],
    "vits16.py": ["", "smoke", "strong"],
    "m3g_vitb16.py": ["", "k=2", "k=3", "k=4", "k=2,smoke", "k=3,smoke", "k=4,smoke"],
    "cifar10.py": ["", "smoke", "strong"],
    "image_folder.py": ["", "smoke"],
}


def load(name, arg=""):
    return config_lib.load_config_file(os.path.join(CONFIG_DIR, name), arg)


def test_every_config_file_is_covered():
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")))
    assert files == sorted(VARIANTS)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in VARIANTS.items() for a in args])
def test_config_loads_locked_and_consistent(name, arg):
    c = load(name, arg)
    assert c.is_locked
    assert c.model.image_size == c.augment.crop_size
    assert c.model.channels == c.data.channels == len(c.augment.mean)
    assert c.loss.name in config_lib.LOSSES
    assert c.optim.batch_size % (c.loss.group_size or 1) == 0
    if "smoke" in arg:
        assert c.data.mock and c.optim.num_steps == 3
    with pytest.raises(AttributeError, match="Did you mean"):
        c.loss.epsilonn = 0.1


def test_paper_config_matches_recipe():
    c = load("vitb16.py")
    assert c.model.variant == "B/16" and c.model.image_size == 224
    assert c.loss.name == "matching_gap" and c.loss.group_size == 64
    assert c.teacher.ema and c.model.projector_hidden_dim == 4096 and c.model.projector_dim == 256
    assert c.optim.num_epochs == 300
    assert c.augment.color_jitter_prob == 0 and c.augment.flip  # crop + flip only


def test_m3g_views():
    for k in (2, 3, 4):
        c = load("m3g_vitb16.py", f"k={k}")
        assert c.augment.num_views == k and c.loss.name == "m3g"


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="valid"):
        load("default.py", "smok")
    with pytest.raises(ValueError, match="k must be"):
        load("m3g_vitb16.py", "k=5")
