"""DINO's objective against numpy transcriptions of DINO's own code (facebookresearch/dino).

Each reference below is the torch code of ``main_dino.py`` (``DINOLoss``, ``train_one_epoch``),
``vision_transformer.py`` (``DINOHead``) or ``utils.py`` (``cosine_scheduler``,
``cancel_gradients_last_layer``) written again in numpy, line for line, on small tensors
chosen so that a wrong rule gives another number: two global views and two local ones,
temperatures that differ, a centre that is not zero. Gradients are checked against finite
differences of the transcription in float64. Each test's docstring names the mistake it
catches.
"""

import contextlib
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from matching_gap import checkpointing, config_lib, losses, models, objectives, schema, train
from matching_gap import sharding as sharding_lib
from matching_gap import state as state_lib

ROOT = os.path.join(os.path.dirname(__file__), "..")


# ------------------------------------------------------------------ the transcriptions


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _log_softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def dino_loss_reference(
    student_output,
    teacher_output,
    center,
    epoch,
    *,
    ncrops,
    schedule,
    student_temp=0.1,
    center_momentum=0.9,
):
    """``DINOLoss.forward`` then ``update_center`` (one process): ``student_output`` is
    [ncrops * B, K] and ``teacher_output`` [2 * B, K], crop-major as ``MultiCropWrapper``
    concatenates them."""
    student_out = np.split(student_output / student_temp, ncrops)
    temp = schedule[epoch]
    teacher_out = np.split(_softmax((teacher_output - center) / temp, axis=-1), 2)
    total_loss, n_loss_terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = np.sum(-q * _log_softmax(student_out[v], axis=-1), axis=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    total_loss /= n_loss_terms
    batch_center = np.sum(teacher_output, axis=0, keepdims=True) / len(teacher_output)
    new_center = center * center_momentum + batch_center * (1 - center_momentum)
    return total_loss, new_center


def teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_epochs, nepochs):
    """``DINOLoss.__init__``'s ``teacher_temp_schedule``."""
    return np.concatenate(
        (
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
            np.ones(nepochs - warmup_epochs) * teacher_temp,
        )
    )


def cosine_scheduler(
    base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0
):
    """``utils.cosine_scheduler``."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / len(iters))
    )
    return np.concatenate((warmup_schedule, schedule))


def _gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def dino_head_reference(x, mlp, weight_v, weight_g):
    """``DINOHead.forward``: ``mlp`` is a list of torch-layout (weight [out, in], bias)
    pairs with GELU between; ``last_layer`` is ``weight_norm(Linear(bias=False))``: weight
    [out, in] = g * v / ||v|| (``norm_except_dim`` over dim 0, g [out, 1])."""
    for i, (w, b) in enumerate(mlp):
        x = x @ w.T + b
        if i < len(mlp) - 1:
            x = _gelu(x)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize
    weight = weight_g * weight_v / np.linalg.norm(weight_v, axis=1, keepdims=True)
    return x @ weight.T


@contextlib.contextmanager
def enable_x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def _numeric_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        g[idx] = (f(up) - f(down)) / (2 * h)
    return g


# ------------------------------------------------------------------------ the loss


def _outputs(ncrops=4, batch=3, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(ncrops, batch, dim))
    teacher = rng.normal(size=(2, batch, dim))
    center = rng.normal(scale=0.5, size=(dim,))
    return student, teacher, center


def _ours(student, teacher, center, temp, **kwargs):
    return losses.dino_loss(
        student, teacher, center, student_temperature=0.1, teacher_temperature=temp, **kwargs
    )


@pytest.mark.parametrize("ncrops", [2, 4])
def test_the_loss_and_the_centre_are_dinolosss(ncrops):
    """Catches: the same-view pairs kept (or a local crop skipped), the temperatures swapped,
    the centre subtracted from the student or not at all, the mean over pairs replaced by a
    sum, the centre updated from the student's outputs or with m and 1 - m swapped."""
    student, teacher, center = _outputs(ncrops)
    schedule = teacher_temp_schedule(0.04, 0.07, 3, 10)
    flat = lambda x: x.reshape(-1, x.shape[-1])  # crop-major, as MultiCropWrapper
    for epoch in (0, 1, 5):
        expected, expected_center = dino_loss_reference(
            flat(student), flat(teacher), center[None], epoch, ncrops=ncrops, schedule=schedule
        )
        value, aux = jax.jit(_ours)(student, teacher, center, schedule[epoch])
        np.testing.assert_allclose(value, expected, rtol=1e-5)
        np.testing.assert_allclose(aux["center"], expected_center[0], rtol=1e-5, atol=1e-7)


def test_the_student_gradient_is_dinolosss_and_the_teacher_gets_none():
    """Catches: a gradient that flows into the teacher's outputs or the centre (DINO detaches
    the targets and updates the centre under no_grad), or a wrong student gradient (finite
    differences of the transcription, float64)."""
    student, teacher, center = _outputs(4, batch=2, dim=4, seed=1)
    schedule = teacher_temp_schedule(0.04, 0.04, 0, 1)
    flat = lambda x: x.reshape(-1, x.shape[-1])

    def reference(s):
        return dino_loss_reference(
            flat(s), flat(teacher), center[None], 0, ncrops=4, schedule=schedule
        )[0]

    with enable_x64():
        grads = jax.grad(lambda s, t, c: _ours(s, t, c, 0.04)[0], argnums=(0, 1, 2))(
            jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center)
        )
    np.testing.assert_allclose(grads[0], _numeric_grad(reference, student), rtol=1e-6, atol=1e-8)
    assert np.all(np.asarray(grads[1]) == 0) and np.all(np.asarray(grads[2]) == 0)


def test_without_centring_the_teacher_is_only_sharpened():
    """Catches: ``loss.centering=False`` still subtracting (or moving) the centre."""
    student, teacher, center = _outputs(4)
    schedule = teacher_temp_schedule(0.04, 0.04, 0, 1)
    flat = lambda x: x.reshape(-1, x.shape[-1])
    expected, _ = dino_loss_reference(
        flat(student), flat(teacher), np.zeros((1, 5)), 0, ncrops=4, schedule=schedule
    )
    value, aux = _ours(student, teacher, center, 0.04, centering=False)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_array_equal(aux["center"], np.asarray(center, np.float32))


@pytest.mark.parametrize("warmup_epochs", [0, 1, 2, 4])
def test_the_teacher_temperature_is_dinos_schedule_by_epoch(warmup_epochs):
    """Catches: a warm-up per step instead of per epoch, one that ends an epoch late
    (``np.linspace`` includes its end point), or epochs counted from 1."""
    epochs, epoch_steps = 6, 3
    schedule = teacher_temp_schedule(0.04, 0.07, warmup_epochs, epochs)
    steps = np.arange(epochs * epoch_steps)
    ours = jax.vmap(
        lambda s: losses.dino_teacher_temperature(
            s, epoch_steps, warmup=0.04, final=0.07, warmup_epochs=warmup_epochs
        )
    )(steps)
    np.testing.assert_allclose(ours, schedule[steps // epoch_steps], rtol=1e-6)


def test_the_teacher_momentum_and_weight_decay_are_dinos_cosine_scheduler():
    """Catches: a cosine that reaches its end value at the last step (DINO's divides by the
    number of steps, so its last value is short of 1) or starts one step late."""
    config = _dino_config("")
    optimizer, schedules = state_lib.make_optimizer(config, 40, 10)
    steps = np.arange(40)
    np.testing.assert_allclose(
        jax.vmap(schedules["momentum"])(steps), cosine_scheduler(0.996, 1.0, 4, 10), rtol=1e-6
    )
    np.testing.assert_allclose(
        jax.vmap(schedules["weight_decay"])(steps),
        cosine_scheduler(0.04, 0.4, 4, 10),
        rtol=1e-5,
    )


# ------------------------------------------------------------------------ the head


def _head(norm_last_layer, seed=0):
    return models.DINOHead(6, 8, 4, 7, 3, norm_last_layer=norm_last_layer, rngs=nnx.Rngs(seed))


def _torch_layout(head):
    params = nnx.to_pure_dict(nnx.state(head, nnx.Param))
    mlp = [
        (np.asarray(layer["kernel"], np.float64).T, np.asarray(layer["bias"], np.float64))
        for _, layer in sorted(params["mlp"]["layers"].items())
    ]
    v = np.asarray(params["last_layer"]["kernel_v"], np.float64).T  # [out, in]
    g = np.asarray(params["last_layer"].get("scale_g", np.ones((1, v.shape[0]))), np.float64).T
    return params, mlp, v, g


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_the_head_is_dinohead(norm_last_layer):
    """Catches: a missing L2 normalisation before the last layer, a weight norm over the
    wrong axis (each output unit's weights are normalised, torch's dim=0), a bias in the last
    layer, tanh-GELU, or a learned norm g although norm_last_layer is set."""
    head = _head(norm_last_layer)
    params, mlp, v, g = _torch_layout(head)
    assert ("scale_g" in params["last_layer"]) is (not norm_last_layer)
    if not norm_last_layer:  # g away from 1, so that a g left out shows
        head.last_layer.scale_g[...] = jnp.linspace(0.5, 2.0, 7)[None]
        params, mlp, v, g = _torch_layout(head)
    x = np.random.default_rng(1).normal(size=(5, 6))
    np.testing.assert_allclose(
        head(jnp.asarray(x, jnp.float32)), dino_head_reference(x, mlp, v, g), rtol=1e-4, atol=1e-5
    )


def test_the_heads_last_layer_gradients_are_weight_norms():
    """Catches: a weight norm whose gradient does not flow through ||v|| (a stop-gradient,
    or v normalised once at initialisation), checked against finite differences in float64."""
    head = _head(False)
    params, mlp, v, g = _torch_layout(head)
    graphdef, state = nnx.split(head)
    x = np.random.default_rng(2).normal(size=(3, 6))
    r = np.random.default_rng(3).normal(size=(3, 7))
    with enable_x64():
        state64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state)
        grads = jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(jnp.asarray(x)) * r))(state64)
    grads = nnx.to_pure_dict(grads)["last_layer"]
    ref = lambda v_, g_: np.sum(dino_head_reference(x, mlp, v_, g_) * r)
    np.testing.assert_allclose(
        np.asarray(grads["kernel_v"]).T,
        _numeric_grad(lambda a: ref(a, g), v),
        rtol=1e-5,
        atol=1e-7,
    )
    np.testing.assert_allclose(
        np.asarray(grads["scale_g"]).T,
        _numeric_grad(lambda a: ref(v, a), g),
        rtol=1e-5,
        atol=1e-7,
    )


def test_the_last_layer_starts_as_torchs_linear_and_its_norms_at_one():
    """Catches: the last layer's v drawn from the trunc-normal of the other layers (DINO
    creates it after its ``_init_weights`` pass: torch's Linear default, U(±1/sqrt(in)),
    std 1/sqrt(3 in)), or g not started at 1."""
    layer = models.WeightNormLinear(256, 4096, learn_norm=True, rngs=nnx.Rngs(0))
    v = np.asarray(layer.kernel_v[...])
    bound = 1 / np.sqrt(256)
    assert v.min() >= -bound and v.max() <= bound and v.max() > 0.99 * bound
    assert np.std(v) == pytest.approx(bound / np.sqrt(3), rel=0.01)
    np.testing.assert_array_equal(layer.scale_g[...], np.ones((1, 4096)))


def test_dinos_rule_decays_the_last_layer_and_its_learned_norm():
    """Catches: g kept 1-D (DINO's [out, 1] is 2-D, so get_params_groups decays it)."""
    head = _head(False)
    params = nnx.to_pure_dict(nnx.state(head, nnx.Param))
    mask = state_lib.decay_mask(params, "dino")
    assert mask["last_layer"]["kernel_v"] and mask["last_layer"]["scale_g"]
    assert not mask["mlp"]["layers"][0]["bias"]


# ------------------------------------------------------------ the step and the state


def _dino_config(arg, **optim):
    c = config_lib.load_config_file(os.path.join(ROOT, "configs", "dino_vits16.py"), arg or None)
    c.optim.update(optim)
    return schema.parse(c)


def _images(n=16, size=32, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def test_the_last_layer_holds_still_for_the_frozen_epochs_then_moves():
    """Catches what ``cancel_gradients_last_layer`` (``p.grad = None``: no Adam step, no weight
    decay) guards against: the last layer moved by weight decay or by Adam's moments during
    the frozen epoch, or held one epoch too long."""
    config = _dino_config("smoke", freeze_last_layer_epochs=1.0, weight_decay=0.3)
    epoch_steps = 2
    optimizer, schedules = state_lib.make_optimizer(config, 4, epoch_steps)
    graphdef, state = state_lib.create_train_state(config, optimizer)
    step = jax.jit(train.make_train_step(config, graphdef, optimizer, schedules))
    images = config_lib_images(config)
    first = state.params["projector"]["last_layer"]["kernel_v"]
    others = state.params["projector"]["mlp"]
    for _ in range(epoch_steps):  # the first epoch: frozen
        state, m = step(state, images)
        assert float(m["train/last_layer_frozen"]) == 1.0
        np.testing.assert_array_equal(state.params["projector"]["last_layer"]["kernel_v"], first)
    adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    assert not np.any(np.asarray(adam.mu["projector"]["last_layer"]["kernel_v"]))
    assert any(
        np.any(a != b)
        for a, b in zip(
            jax.tree.leaves(state.params["projector"]["mlp"]), jax.tree.leaves(others), strict=True
        )
    )
    state, m = step(state, images)  # epoch 1: free
    assert float(m["train/last_layer_frozen"]) == 0.0
    assert np.any(state.params["projector"]["last_layer"]["kernel_v"] != first)


def config_lib_images(config):
    return _images(16, config.data.image_size, config.data.channels)


def test_a_step_moves_the_centre_by_the_teachers_global_views():
    """Catches: the centre left at zero (not carried in the state), or fed by the student's
    outputs or the local crops (DINO's teacher sees the two global crops only)."""
    config = _dino_config("smoke")
    optimizer, schedules = state_lib.make_optimizer(config, 4, 2)
    graphdef, state = state_lib.create_train_state(config, optimizer)
    assert state.center.shape == (config.model.projector_dim,)
    captured = {}

    def spy(student, targets, **kw):
        captured["targets"], captured["student"] = targets, student
        return objectives.ssl_loss(config.loss, student, targets, ema=True, **kw)

    step = train.make_train_step(config, graphdef, optimizer, schedules)
    original = objectives.make_objective
    objectives.make_objective = lambda *a, **k: spy
    try:
        step = train.make_train_step(config, graphdef, optimizer, schedules)
        new, metrics = step(state, config_lib_images(config))
    finally:
        objectives.make_objective = original
    targets = np.asarray(captured["targets"])
    views = 2 + config.augment.num_local_crops
    assert targets.shape[0] == 2 and captured["student"].shape[0] == views
    m = config.loss.center_momentum
    expected = m * 0.0 + (1 - m) * targets.reshape(-1, targets.shape[-1]).mean(0)
    np.testing.assert_allclose(new.center, expected, rtol=1e-5, atol=1e-7)
    assert float(metrics["train/teacher_temperature"]) == pytest.approx(0.04)


def test_a_checkpoint_without_a_centre_restores_and_a_dino_run_resumes_its_centre(tmp_path):
    """Catches: the new field breaking checkpoints of the other losses (a None leaf adds
    nothing), and a DINO run that restores its centre as zeros."""
    load = lambda arg: config_lib.load_config_file(os.path.join(ROOT, "configs", "default.py"), arg)
    config = schema.parse(load("smoke"))
    optimizer, _ = state_lib.make_optimizer(config, 10, 1)
    _, state = state_lib.create_train_state(config, optimizer)
    assert state.center is None
    # The tree a checkpoint of the state before the field held: the four fields alone.
    before = {
        "step": state.step,
        "params": state.params,
        "teacher": state.teacher,
        "opt_state": state.opt_state,
    }
    ckpt = checkpointing.Checkpointer(str(tmp_path / "old"))
    ckpt.save(3, before, force=True)
    ckpt.close()
    mesh = sharding_lib.make_mesh()
    _, abstract, _ = state_lib.abstract_train_state(config, optimizer, mesh)
    reader = checkpointing.Checkpointer(str(tmp_path / "old"), read_only=True)
    restored = reader.restore_latest(abstract)
    reader.close()
    assert restored.center is None
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    config = _dino_config("smoke")
    optimizer, _ = state_lib.make_optimizer(config, 10, 1)
    _, state = state_lib.create_train_state(config, optimizer)
    state = state.replace(center=jnp.arange(config.model.projector_dim, dtype=jnp.float32))
    ckpt = checkpointing.Checkpointer(str(tmp_path / "dino"))
    ckpt.save(1, state, force=True)
    ckpt.close()
    _, abstract, _ = state_lib.abstract_train_state(config, optimizer, mesh)
    reader = checkpointing.Checkpointer(str(tmp_path / "dino"), read_only=True)
    restored = reader.restore_latest(abstract)
    reader.close()
    np.testing.assert_array_equal(restored.center, np.asarray(state.center))


# main_dino.py's argparse defaults (facebookresearch/dino, ``get_args_parser``), transcribed;
# DINO's README runs them unchanged on 8 GPUs: ``torch.distributed.launch --nproc_per_node=8
# main_dino.py --arch vit_small`` ("1.75 day", 69.3% k-NN, 74.0% linear).
MAIN_DINO_DEFAULTS = dict(
    arch="vit_small", patch_size=16, out_dim=65536, norm_last_layer=True, momentum_teacher=0.996,
    use_bn_in_head=False, warmup_teacher_temp=0.04, teacher_temp=0.04,
    warmup_teacher_temp_epochs=0, use_fp16=True, weight_decay=0.04, weight_decay_end=0.4,
    clip_grad=3.0, batch_size_per_gpu=64, epochs=100, freeze_last_layer=1, lr=0.0005,
    warmup_epochs=10, min_lr=1e-6, optimizer="adamw", drop_path_rate=0.1,
    global_crops_scale=(0.4, 1.0), local_crops_number=8, local_crops_scale=(0.05, 0.4),
)  # fmt: skip
README_GPUS = 8
# Fixed in DINO's code, not flags: DINOHead(nlayers=3, hidden_dim=2048, bottleneck_dim=256),
# DINOLoss(student_temp=0.1, center_momentum=0.9), vit_small (384 wide, 12 blocks, 6 heads,
# mlp_ratio 4, LayerNorm eps 1e-6), DataAugmentationDINO (global crops 224, local crops 96),
# torch.optim.AdamW's betas (0.9, 0.999).


def test_the_dino_config_is_dinos_readme_command_setting_for_setting():
    """``configs/dino_vits16.py`` against the transcription above. Catches: a setting that
    drifts with the paper's recipe it starts from (``config_lib.imagenet_recipe``: batch 1024,
    300 epochs, 10 local crops, the matching gap's head), or a learning rate not scaled as
    DINO's linear rule."""
    a = MAIN_DINO_DEFAULTS
    c = schema.parse(config_lib.load_config_file(os.path.join(ROOT, "configs", "dino_vits16.py")))
    assert a["arch"] == "vit_small" and c.model.variant == "S/16"
    assert c.model.encoder_sizes() == dict(
        width=384, depth=12, num_heads=6, mlp_dim=4 * 384, patch_size=a["patch_size"]
    )
    assert (c.model.layer_norm_eps, c.model.drop_path_rate) == (1e-6, a["drop_path_rate"])
    assert c.model.dtype == ("bfloat16" if a["use_fp16"] else "float32")
    assert (c.model.head, c.model.head_batchnorm, c.model.use_predictor) == (
        "dino",
        a["use_bn_in_head"],
        False,
    )
    assert (c.model.projector_layers, c.model.projector_hidden_dim) == (3, 2048)
    assert (c.model.head_bottleneck_dim, c.model.projector_dim) == (256, a["out_dim"])
    assert c.model.norm_last_layer == a["norm_last_layer"]

    assert c.loss.name == "dino" and c.loss.centering
    assert (c.loss.student_temperature, c.loss.center_momentum) == (0.1, 0.9)
    assert (
        c.loss.warmup_teacher_temperature,
        c.loss.teacher_temperature,
        c.loss.teacher_temperature_warmup_epochs,
    ) == (a["warmup_teacher_temp"], a["teacher_temp"], a["warmup_teacher_temp_epochs"])
    assert (c.teacher.ema, c.teacher.momentum, c.teacher.momentum_end) == (
        True,
        a["momentum_teacher"],
        1.0,
    )

    o = c.optim
    assert a["optimizer"] == "adamw" and (o.b1, o.b2) == (0.9, 0.999)
    assert o.batch_size == a["batch_size_per_gpu"] * README_GPUS
    assert o.num_epochs == a["epochs"] and o.warmup_epochs == a["warmup_epochs"]
    # lr_schedule's peak: args.lr * (batch_size_per_gpu * world_size) / 256.
    peak = a["lr"] * a["batch_size_per_gpu"] * README_GPUS / 256
    assert o.base_lr * o.batch_size / 256 == pytest.approx(peak)
    assert o.min_lr == a["min_lr"]
    assert (o.weight_decay, o.weight_decay_end) == (a["weight_decay"], a["weight_decay_end"])
    assert (o.grad_clip, o.grad_clip_mode) == (a["clip_grad"], "per_parameter")
    assert o.weight_decay_mask == "dino"
    assert o.freeze_last_layer_epochs == a["freeze_last_layer"]

    g = c.augment
    assert (g.num_views, g.crop_size, g.crop_scale) == (2, 224, a["global_crops_scale"])
    assert (g.num_local_crops, g.local_crop_size, g.local_crop_scale) == (
        a["local_crops_number"],
        96,
        a["local_crops_scale"],
    )


def test_dino_needs_a_teacher_and_no_predictor():
    c = config_lib.load_config_file(os.path.join(ROOT, "configs", "dino_vits16.py"), "smoke")
    c.teacher.ema = False
    with pytest.raises(schema.errors.ConfigError, match="teacher.ema=True"):
        schema.parse(c)
    c.teacher.ema = True
    c.model.use_predictor = True
    with pytest.raises(schema.errors.ConfigError, match="no predictor"):
        schema.parse(c)


# ---------------------------------------------- the evaluation check: DINO's released ViT-S


def test_the_released_vit_s16_check_evaluates_as_dinos_eval_scripts(tmp_path):
    """``experiments/recipes.md``, "Check the pipeline first", step (a): DINO's released
    ViT-S/16 as a timm directory through ``model.init_from``, evaluated with
    ``configs/dino_vits16.py``. On a ViT-S-shaped file (width 384, 6 heads, MLP 1536, patch
    16 at 224 px; 4 blocks instead of 12 to stay small), every setting that check needs is
    the one of DINO's ``eval_knn.py`` / ``eval_linear.py``. Catches: a recipe whose
    features, image size, LayerNorm epsilon or normalisation differ from the file's and
    DINO's (the check would then report a pipeline bug that is a setting)."""
    from matching_gap import export, models

    c = config_lib.load_config_file(os.path.join(ROOT, "configs", "dino_vits16.py"))
    config = schema.parse(c)
    # eval_knn.py: 20 neighbours, T 0.07, on model(samples) (the last CLS token after the norm).
    assert (config.eval.knn_features, config.eval.knn_k, config.eval.knn_temperature) == (
        "cls",
        20,
        0.07,
    )
    # eval_linear.py for ViT-S: n_last_blocks 4, avgpool_patchtokens False.
    assert config.eval.features == "last4_cls"
    # Both: Resize(256, bicubic), CenterCrop(224), ImageNet's mean and std.
    assert (config.data.image_size, config.augment.crop_size) == (256, 224)
    assert config.augment.eval_crop_fraction == pytest.approx(224 / 256)
    assert config.augment.mean == schema.IMAGENET_MEAN
    assert config.augment.std == schema.IMAGENET_STD
    # vision_transformer.vit_small: patch 16, 384 wide, 6 heads, MLP 4x, LayerNorm eps 1e-6.
    assert config.model.encoder_sizes() == dict(
        width=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=16
    )
    assert config.model.layer_norm_eps == 1e-6 and config.model.pooling == "cls"

    # A ViT-S-shaped timm file, with the preprocessing timm records for vit_small_patch16_224.dino.
    small = dataclasses.replace(config.model, variant="", width=384, depth=4, num_heads=6,
                                mlp_dim=1536, patch_size=16)  # fmt: skip
    encoder = models.create_model(small, rngs=nnx.Rngs(0)).encoder
    params = jax.device_get(nnx.to_pure_dict(nnx.state(encoder, nnx.Param)))
    dino_preprocessing = {
        "mean": schema.IMAGENET_MEAN,
        "std": schema.IMAGENET_STD,
        "crop_pct": 0.875,
    }
    directory = str(tmp_path / "dino_vits16_timm")
    export.write_encoder(params, small, "timm", directory, preprocessing=dino_preprocessing)
    with open(os.path.join(directory, export.CONFIG_FILE)) as f:
        pretrained = json.load(f)["pretrained_cfg"]
    assert tuple(pretrained["mean"]) == config.augment.mean
    assert tuple(pretrained["std"]) == config.augment.std
    assert pretrained["crop_pct"] == pytest.approx(config.augment.eval_crop_fraction)
    assert pretrained["interpolation"] == "bicubic"

    # The check's path: no checkpoint in the workdir, so the evaluated encoder is the file's.
    c.model.update(variant="", width=384, depth=4, num_heads=6, mlp_dim=1536, patch_size=16)
    c.model.init_from = directory
    config = schema.parse(c)
    graphdef, restored, step = state_lib.restore_encoder(config, str(tmp_path / "empty"))
    assert step == 0
    for a, b in zip(jax.tree.leaves(restored["encoder"]), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    model = nnx.merge(graphdef, restored)
    assert model.encoder.norm.epsilon == 1e-6
    images = jnp.zeros((2, 224, 224, 3), jnp.float32)
    assert model.encode(images, "cls").shape == (2, 384)
    assert model.encode(images, "last4_cls").shape == (2, 4 * 384)
