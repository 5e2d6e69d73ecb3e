"""The train state: the evaluated encoder restored from a checkpoint without the rest, and the
optimiser (DINO's clipping and weight-decay rules, checkpoints of the earlier optimiser)."""

import os

import jax
import numpy as np
import optax
import pytest
import tensorstore as ts
from flax import nnx

from matching_gap import checkpointing, config_lib, errors, schema
from matching_gap import sharding as sharding_lib
from matching_gap import state as state_lib

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _delete(checkpoint: str, *prefixes: str) -> None:
    """Deletes the arrays under ``prefixes`` (saved field names) from an Orbax checkpoint."""
    store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{checkpoint}/"}).result()
    for prefix in prefixes:
        start = prefix.encode()
        store.delete_range(ts.KvStore.KeyRange(start, start + b"\xff")).result()


@pytest.mark.parametrize("ema", [True, False])
def test_restore_encoder_reads_the_evaluated_parameters_only(tmp_path, monkeypatch, ema):
    monkeypatch.setattr(sharding_lib, "FSDP_MIN_SIZE", 256)  # FSDP shards the small model
    monkeypatch.setattr(checkpointing, "RESTORE_RETRY_SECONDS", 0.0)
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "default.py"), "smoke")
    config.teacher.ema = ema
    config.train.fsdp = True
    config = schema.parse(config)
    mesh = sharding_lib.make_mesh()
    optimizer, _ = state_lib.make_optimizer(config, 2, 1)
    _, abstract, shardings = state_lib.abstract_train_state(config, optimizer, mesh)
    state = state_lib.init_train_state(config, optimizer, shardings)
    if ema:  # a teacher unlike the student
        state = state.replace(teacher=jax.tree.map(lambda x: x + 1.0, state.params))
    state = state.replace(step=state.step + 3)
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    ckpt.save(3, state, force=True)  # as training saves
    ckpt.close()

    full = checkpointing.Checkpointer(str(tmp_path), read_only=True)
    expected = state_lib.encoder_params(config, full.restore_latest(abstract))
    full.close()
    _, params, step = state_lib.restore_encoder(config, str(tmp_path), mesh)
    assert step == 3
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == want.sharding  # FSDP as in training
    assert any(x.sharding.spec != jax.sharding.PartitionSpec() for x in jax.tree.leaves(params))

    # Without the optimiser state and the other model, the encoder still restores; a
    # full restore no longer can.
    _delete(
        str(tmp_path / "checkpoints" / "3" / "default"),
        "opt_state",
        "params." if ema else "teacher.",
    )
    _, again, step = state_lib.restore_encoder(config, str(tmp_path), mesh)
    assert step == 3
    for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    full = checkpointing.Checkpointer(str(tmp_path), read_only=True)
    with pytest.raises(errors.WorkdirError):
        full.restore_latest(abstract)
    full.close()


# ------------------------------------------------ the optimiser: DINO's rules, transcribed


def dino_clip_gradients(named_grads: dict, clip: float) -> dict:
    """DINO's ``utils.clip_gradients`` (facebookresearch/dino), on ``{name: grad}``:

    for name, p in model.named_parameters():
        param_norm = p.grad.data.norm(2)
        clip_coef = clip / (param_norm + 1e-6)
        if clip_coef < 1:
            p.grad.data.mul_(clip_coef)
    """
    out = {}
    for name, g in named_grads.items():
        g = np.array(g, np.float64)
        param_norm = np.linalg.norm(g.ravel(), 2)
        clip_coef = clip / (param_norm + 1e-6)
        if clip_coef < 1:
            g = g * clip_coef
        out[name] = g
    return out


def dino_not_regularized(named_shapes: dict) -> set:
    """DINO's ``utils.get_params_groups``: the names it puts in the weight-decay-free group.

    if name.endswith(".bias") or len(param.shape) == 1:
        not_regularized.append(param)
    """
    return {
        name for name, shape in named_shapes.items() if name.endswith(".bias") or len(shape) == 1
    }


def named(tree) -> dict:
    """``{"a.b.c": leaf}``: PyTorch-style names of a nested dict's leaves."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(str(k.key) for k in path): leaf for path, leaf in flat}


def grads_tree():
    """Gradients whose tensors' norms straddle a clip of 3: 10, 1 and 4 (and a tiny one)."""
    rng = np.random.default_rng(0)

    def of_norm(shape, norm):
        g = rng.normal(size=shape).astype(np.float32)
        return g * np.float32(norm / np.linalg.norm(g))

    return {
        "blocks": {"0": {"qkv": {"kernel": of_norm((4, 12), 10.0), "bias": of_norm((12,), 1.0)}}},
        "norm": {"scale": of_norm((4,), 4.0), "bias": of_norm((4,), 1e-3)},
        "pos_embed": of_norm((2, 2, 4), 2.0),
    }


def optim_config(**optim):
    config = config_lib.base_config()
    config.optim.update(warmup_epochs=0.0, **optim)
    return schema.parse(config)


def test_per_parameter_clipping_is_dinos_clip_gradients():
    grads = grads_tree()
    optim = optim_config(grad_clip=3.0, grad_clip_mode="per_parameter").optim
    clip = state_lib.gradient_clipping(optim)
    clipped, _ = jax.jit(clip.update)(grads, clip.init(grads))
    expected = dino_clip_gradients(named(grads), 3.0)
    got = named(clipped)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)
    # Only the two tensors with norms above 3 changed, each to norm 3.
    changed = {n for n in got if not np.array_equal(got[n], named(grads)[n])}
    assert changed == {"blocks.0.qkv.kernel", "norm.scale"}
    # "global" is one norm over all of them: optax's clip_by_global_norm.
    global_clip = state_lib.gradient_clipping(optim_config(grad_clip=3.0).optim)
    clipped, _ = global_clip.update(grads, global_clip.init(grads))
    reference, _ = optax.clip_by_global_norm(3.0).update(grads, optax.EmptyState())
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["per_parameter", "global"])
def test_the_optimiser_clips_as_its_mode_says_then_runs_adamw(mode):
    """Two AdamW steps (the second one's update depends on the scale of both gradients) of
    ``make_optimizer`` against plain AdamW on gradients clipped by the rule transcribed."""
    config = optim_config(
        grad_clip=3.0, grad_clip_mode=mode, weight_decay=0.0, weight_decay_end=0.0, b1=0.5
    )
    optimizer, schedules = state_lib.make_optimizer(config, 10, 1)
    first = grads_tree()
    second = jax.tree.map(lambda g: g[::-1] * 0.5, first)  # other norms per tensor
    first["blocks"]["0"]["qkv"]["kernel"] *= 0.1  # 1 at step 1, 5 at step 2
    params = jax.tree.map(np.ones_like, first)
    reference = optax.adamw(schedules["lr"], b1=0.5, b2=0.999, weight_decay=0.0)

    def clipped(grads):
        if mode == "global":
            return optax.clip_by_global_norm(3.0).update(grads, optax.EmptyState())[0]
        by_name = dino_clip_gradients(named(grads), 3.0)
        return jax.tree_util.tree_map_with_path(
            lambda path, _: by_name[".".join(str(k.key) for k in path)], grads
        )

    s, r = optimizer.init(params), reference.init(params)
    for grads in (first, second):
        got, s = optimizer.update(grads, s, params)
        want, r = reference.update(clipped(grads), r, params)
    for name, value in named(got).items():
        np.testing.assert_allclose(value, named(want)[name], rtol=1e-5, atol=1e-9, err_msg=name)


def smoke(**optim):
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "default.py"), "smoke")
    config.optim.update(**optim)
    return schema.parse(config)


@pytest.mark.parametrize("rule", ["dino", "dino_except_tokens"])
def test_weight_decay_goes_where_dinos_get_params_groups_puts_it(rule):
    """What the real optimiser decays (a zero gradient: AdamW's step is then the decay
    alone) on the model's parameters, plus a 2-D tensor named ``bias`` (DINO's name rule)."""
    config = smoke(weight_decay_mask=rule)
    optimizer, _ = state_lib.make_optimizer(config, 10, 1)
    params = nnx.to_pure_dict(nnx.state(state_lib.create_model(config), nnx.Param))
    params["extra"] = {"bias": np.ones((3, 3), np.float32)}
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(params), params)
    decayed = {n for n, u in named(updates).items() if np.any(np.asarray(u) != 0)}
    shapes = {n: np.shape(x) for n, x in named(params).items()}
    expected = set(shapes) - dino_not_regularized(shapes)
    if rule == "dino_except_tokens":  # the project's earlier rule, kept for the demo
        expected = {n for n in expected if "pos_embed" not in n and "cls_token" not in n}
    else:
        assert {"encoder.pos_embed", "encoder.cls_token", "encoder.cls_pos_embed"} <= decayed
    assert "extra.bias" not in decayed and "encoder.norm.scale" not in decayed
    assert decayed == expected


def test_the_imagenet_recipes_take_dinos_rules_and_the_demo_keeps_its_own():
    for name in ("vitb16.py", "vits16.py", "m3g_vitb16.py"):
        optim = config_lib.load_config_file(os.path.join(ROOT, "configs", name)).optim
        assert (optim.grad_clip_mode, optim.weight_decay_mask, optim.grad_clip) == (
            "per_parameter",
            "dino",
            3.0,
        ), name
    demo = config_lib.load_config_file(os.path.join(ROOT, "configs", "default.py")).optim
    assert (demo.grad_clip_mode, demo.weight_decay_mask) == ("global", "dino_except_tokens")


def test_a_checkpoint_of_the_earlier_optimiser_restores_into_the_new_one(tmp_path):
    """A state saved with the optimiser as it was (global-norm clipping, position embeddings
    and CLS token free of decay) restores into DINO's per-parameter clipping and mask, and
    trains on."""
    config = smoke(grad_clip_mode="per_parameter", weight_decay_mask="dino")
    o = config.optim

    def earlier_mask(params):  # state.py's decay_mask before DINO's rule
        exempt = ("pos_embed", "cls_token")
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x.ndim > 1 and not any(n in jax.tree_util.keystr(path) for n in exempt),
            params,
        )

    lr = optax.cosine_decay_schedule(o.base_lr, 10)
    earlier = optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=lambda step: 0.04, mask=earlier_mask),
    )
    _, old = state_lib.create_train_state(config, earlier)
    grads = jax.tree.map(lambda p: np.full(p.shape, 0.01, p.dtype), old.params)
    _, opt_state = earlier.update(grads, old.opt_state, old.params)
    old = old.replace(step=old.step + 5, opt_state=opt_state)
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    ckpt.save(5, old, force=True)
    ckpt.close()

    optimizer, _ = state_lib.make_optimizer(config, 10, 1)
    mesh = sharding_lib.make_mesh()
    _, abstract, _ = state_lib.abstract_train_state(config, optimizer, mesh)
    reader = checkpointing.Checkpointer(str(tmp_path), read_only=True)
    restored = reader.restore_latest(abstract)
    reader.close()
    assert int(restored.step) == 5
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(old), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    updates, _ = optimizer.update(grads, restored.opt_state, restored.params)
    assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(updates))


def test_grad_norm_is_the_raw_gradients_global_norm_whatever_the_clipping():
    from matching_gap import train

    images = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    norms = []
    for clip in (0.0, 1e-3):
        config = smoke(grad_clip=clip, grad_clip_mode="per_parameter")
        optimizer, schedules = state_lib.make_optimizer(config, 10, 1)
        graphdef, state = state_lib.create_train_state(config, optimizer)
        step = jax.jit(train.make_train_step(config, graphdef, optimizer, schedules))
        _, out = step(state, images)
        norms.append(float(out["train/grad_norm"]))
    # Clipped per tensor to 1e-3, no gradient's global norm could exceed this bound.
    bound = 1e-3 * np.sqrt(len(jax.tree.leaves(state.params)))
    assert norms[1] > 10 * bound
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)
