"""On N devices each device does 1/N of the work: checked on the compiled programs.

Equal numbers on 1 and 4 devices (tests/test_sharding.py) do not show that the work is
divided: every device computing the whole batch gives the same numbers. Here each jitted
step is compiled for 1 and for 4 simulated devices from abstract inputs, and XLA's own
per-device FLOP count (``cost_analysis``) on 4 devices must be a quarter of the 1-device
count (within 10%); the compiled program may all-gather only what the algorithm needs on
every device (a global OT problem's embeddings, FSDP's parameters, the k-NN's candidates),
never images or activations.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matching_gap import config_lib, plan, schema
from matching_gap import sharding as sharding_lib
from matching_gap import state as state_lib
from matching_gap.evaluation import augmented_probe, encoder
from matching_gap.evaluation import features as features_lib
from matching_gap.evaluation import knn as knn_lib
from matching_gap.evaluation import linear_probe as probe_lib

ROOT = os.path.join(os.path.dirname(__file__), "..")
TOLERANCE = 0.10


def load(name, arg=None):
    return config_lib.load_config_file(os.path.join(ROOT, "configs", name), arg)


def mesh_of(n):
    return sharding_lib.make_mesh(jax.devices()[:n])


def abstract(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def per_device_work(compile_fn):
    """``(flops on 1 device, flops per device on 4, the 4-device program's all-gathers)``."""
    one = compile_fn(mesh_of(1))
    four = compile_fn(mesh_of(4))
    gathers = [c for c in plan.collectives(four.as_text()) if c.kind == "all-gather"]
    return plan.compiled_flops(one), plan.compiled_flops(four), gathers


def assert_quarter(flops_1, flops_4):
    ratio = flops_4 / flops_1
    assert abs(ratio - 0.25) <= 0.25 * TOLERANCE, (
        f"each of 4 devices does {ratio:.3f} of the 1-device work ({flops_4:.4g} of "
        f"{flops_1:.4g} FLOPs), not 1/4"
    )


# ------------------------------------------------------------------------ train steps


def _train_config(name, arg, **overrides):
    config = load(name, arg)
    config.optim.batch_size = 64  # 16 per device: enough rows for the counts to be clean
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    return schema.parse(config)


TRAIN_STEPS = {
    # global OT problem: the embeddings are gathered for it, nothing else
    "matching_gap": ("default.py", "smoke", {}),
    # OT groups solved on each device
    "matching_gap_groups": ("default.py", "smoke", {"loss__group_size": 8}),
    # EMA teacher, 2 global + 10 local crops, per-device groups, predictor
    "teacher_local_crops": ("vitb16.py", "smoke", {}),
    "fsdp": ("vitb16.py", "smoke", {"train__fsdp": True}),
    "info_nce": ("default.py", "smoke,info_nce", {}),
    "byol": ("default.py", "smoke,byol", {}),  # teacher, BatchNorm heads (synchronised)
    "m3g_3_views": ("m3g_vitb16.py", "k=3,smoke", {}),
}
_SLOW = {"info_nce", "byol", "m3g_3_views", "teacher_local_crops", "fsdp"}


def _allowed_gather(config, params_shapes, c: plan.Collective) -> bool:
    """At most the embeddings of every view of the whole batch (what a global loss needs,
    in whatever layout XLA picks), or (FSDP) a parameter. An image of the smoke configs
    holds 784 or 3072 values and its tokens 17 x 32 or more; its embedding 32."""
    views = config.augment.num_views + config.augment.num_local_crops
    most = views * config.optim.batch_size * config.model.projector_dim
    return all(np.prod(shape) <= most or shape in params_shapes for _, shape in c.arrays)


@pytest.mark.parametrize(
    "variant",
    [pytest.param(v, marks=pytest.mark.slow) if v in _SLOW else v for v in TRAIN_STEPS],
)
def test_train_step_divides_its_work(variant, monkeypatch):
    name, arg, overrides = TRAIN_STEPS[variant]
    config = _train_config(name, arg, **overrides)
    if config.train.fsdp:
        # The smoke model's arrays are all small: shard them anyway.
        monkeypatch.setattr(sharding_lib, "FSDP_MIN_SIZE", 256)
    flops_1, flops_4, gathers = per_device_work(lambda m: plan.compile_train_step(config, m))
    assert_quarter(flops_1, flops_4)
    optimizer, _ = state_lib.make_optimizer(config, 10, 1)
    state = state_lib.abstract_train_state(config, optimizer, mesh_of(1))[1]
    params_shapes = {x.shape for x in jax.tree.leaves(state.params)}
    wrong = [c.arrays for c in gathers if not _allowed_gather(config, params_shapes, c)]
    assert not wrong, f"all-gathers of images or activations: {wrong}"
    if config.train.fsdp:
        assert gathers, "FSDP gathers its parameters; no all-gather means none is sharded"


# ------------------------------------------------------------------ evaluation steps


EVAL_BATCH = 64


def _eval_config():
    config = load("default.py", "smoke")
    config.model.update(depth=4)
    config.eval.features = "last4_cls"
    return schema.parse(config)


def _encoder(config, mesh):
    optimizer, _ = state_lib.make_optimizer(config, 10, 1)
    graphdef, state, _ = state_lib.abstract_train_state(config, optimizer, mesh)
    return graphdef, state.params


def _images(config, mesh):
    size = config.data.image_size
    return abstract(
        (EVAL_BATCH, size, size, config.data.channels), jnp.uint8, sharding_lib.batch_sharding(mesh)
    )


def test_feature_extraction_divides_its_work():
    config = _eval_config()

    def compile_fn(mesh):
        graphdef, params = _encoder(config, mesh)
        encode = encoder.make_encode(config, graphdef, mesh)
        return encode.lower(params, _images(config, mesh)).compile()

    flops_1, flops_4, gathers = per_device_work(compile_fn)
    assert_quarter(flops_1, flops_4)
    assert not gathers, [c.arrays for c in gathers]


def test_augmented_probe_step_divides_its_work():
    config = _eval_config()
    settings = dataclasses.replace(
        augmented_probe.AugmentedSettings.from_eval(config.eval),
        batch_size=EVAL_BATCH,
        batchnorm=True,
    )
    dim = 4 * config.model.width  # last4_cls

    def compile_fn(mesh):
        graphdef, params = _encoder(config, mesh)
        step = augmented_probe._make_step(config, graphdef, settings, 100, mesh)
        init = lambda: augmented_probe._init_state(
            len(settings.learning_rates), dim, 10, augmented_probe.init_key(0)
        )
        state = jax.tree.map(
            lambda x: abstract(x.shape, x.dtype, sharding_lib.replicated(mesh)),
            jax.eval_shape(init),
        )
        labels = abstract((EVAL_BATCH,), jnp.int32, sharding_lib.batch_sharding(mesh))
        return step.lower(state, params, _images(config, mesh), labels).compile()

    flops_1, flops_4, gathers = per_device_work(compile_fn)
    assert_quarter(flops_1, flops_4)
    assert not gathers, [c.arrays for c in gathers]


# A split of 8 batches of 256 rows of 64-dimensional features, 10 classes.
NUM_BATCHES, ROWS, DIM, CLASSES = 8, 256, 64, 10


def _features(mesh):
    stacked = features_lib.stacked_sharding(mesh)
    return (
        abstract((NUM_BATCHES, ROWS, DIM), jnp.float32, stacked),
        abstract((NUM_BATCHES, ROWS), jnp.int32, stacked),
        abstract((NUM_BATCHES, ROWS), bool, stacked),
    )


def test_knn_divides_its_work():
    k = 20

    def compile_fn(mesh):
        count = knn_lib._knn_counter(mesh, k, 0.07, CLASSES, knn_lib.QUERY_CHUNK)
        split = _features(mesh)
        index = abstract((), jnp.int32, sharding_lib.replicated(mesh))
        return count.lower(*split, *split, index).compile()

    flops_1, flops_4, gathers = per_device_work(compile_fn)
    assert_quarter(flops_1, flops_4)
    # Only what the algorithm shares: the batch of queries (every device scores them
    # against its own rows) and the candidates (each device's k best per query).
    for c in gathers:
        for _, shape in c.arrays:
            assert shape[-1] in (DIM, 4 * k) and np.prod(shape) <= ROWS * max(DIM, 4 * k), shape


def test_linear_probe_epoch_divides_its_work():
    heads, steps, batch = 18, 4, 256

    def compile_fn(mesh):
        rep = sharding_lib.replicated(mesh)
        epoch = probe_lib._probe_epoch(mesh, 100)
        params = {
            "w": abstract((heads, DIM, CLASSES), jnp.float32, rep),
            "b": abstract((heads, CLASSES), jnp.float32, rep),
        }
        opt_state = jax.tree.map(
            lambda x: abstract(x.shape, x.dtype, rep), jax.eval_shape(probe_lib._ADAM.init, params)
        )
        features, labels, _ = _features(mesh)
        vector = abstract((DIM,), jnp.float32, rep)
        rows = abstract((steps, batch), jnp.int32, rep)
        grid = abstract((heads,), jnp.float32, rep)
        step0 = abstract((), jnp.int32, rep)
        return epoch.lower(
            params, opt_state, features, labels, vector, vector, rows, rows, grid, grid, step0
        ).compile()

    flops_1, flops_4, gathers = per_device_work(compile_fn)
    assert_quarter(flops_1, flops_4)
    assert not gathers, [c.arrays for c in gathers]
