"""The train state and how it is built: the model, the optimiser and its schedules, the
random-init or imported start, its layout on the mesh, and the evaluated encoder of a
checkpoint (:func:`restore_encoder`).

``matching_gap.train``, ``matching_gap.evaluation``, ``matching_gap.pictures`` and
``matching_gap.plan`` build on this module; it imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from matching_gap import checkpointing, errors, export, losses, metrics, models, schema
from matching_gap import sharding as sharding_lib


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # student parameters (pure dict)
    teacher: Any  # EMA teacher parameters, or None with shared weights
    opt_state: Any
    # DINO's centre of the teacher's outputs [projector_dim] (loss.name="dino"), else None.
    # Left out of the checkpoint while None (checkpointing.OPTIONAL), so runs of the other
    # losses save and restore the tree they did before the field existed.
    center: Any = struct.field(default=None, metadata={checkpointing.OPTIONAL: True})


def steps_per_epoch(config: schema.Config, num_examples: int) -> int:
    return max(num_examples // config.optim.batch_size, 1)


def total_steps(config: schema.Config, num_examples: int) -> int:
    """``optim.num_steps``, or ``optim.num_epochs`` of whole batches (rounded)."""
    if config.optim.num_steps > 0:
        return int(config.optim.num_steps)
    return max(int(round(config.optim.num_epochs * steps_per_epoch(config, num_examples))), 1)


def _cosine(start: float, end: float, steps: int) -> Callable[[jax.Array], jax.Array]:
    def schedule(step):
        frac = jnp.clip(step / max(steps, 1), 0.0, 1.0)
        return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule


def clip_per_parameter(max_norm: float) -> optax.GradientTransformation:
    """Each parameter tensor's gradient clipped to L2 norm ``max_norm`` on its own, DINO's
    ``utils.clip_gradients``: ``g *= c`` where ``c = max_norm / (||g|| + 1e-6) < 1``.

    Stateless (``optax.EmptyState``, as ``optax.clip_by_global_norm``), so the optimiser
    state has the same structure whichever clipping a run uses.
    """

    def clip(g):
        coef = max_norm / (jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)))) + 1e-6)
        return jnp.where(coef < 1.0, g * coef.astype(g.dtype), g)

    return optax.stateless(lambda updates, params=None: jax.tree.map(clip, updates))


def gradient_clipping(optim: schema.OptimConfig) -> optax.GradientTransformation:
    """``optim.grad_clip`` applied as ``optim.grad_clip_mode`` says (see
    :data:`schema.GRAD_CLIP_MODES`); ``grad_clip=0`` clips nothing."""
    # Clipping stays in the chain when off (an infinite norm) so that the optimiser state
    # has one structure whatever the setting, and checkpoints restore across it.
    max_norm = optim.grad_clip if optim.grad_clip > 0 else float("inf")
    if optim.grad_clip_mode == "per_parameter":
        return clip_per_parameter(max_norm)
    return optax.clip_by_global_norm(max_norm)


_TOKENS = ("pos_embed", "cls_token")  # also matches cls_pos_embed


def decay_mask(params, rule: str = "dino") -> Any:
    """True for the parameters that get weight decay under ``rule``
    (:data:`schema.WEIGHT_DECAY_MASKS`).

    ``"dino"``: every parameter but biases and 1-D tensors (LayerNorm / BatchNorm scales),
    DINO's ``get_params_groups``: ``name.endswith(".bias") or len(param.shape) == 1``. The
    CLS token and the position embeddings (3-D here as in DINO) are decayed.
    ``"dino_except_tokens"``: nor the position embeddings and the CLS token.
    """

    def decayed(path, x):
        name = path[-1].key if path and hasattr(path[-1], "key") else ""
        if name == "bias" or x.ndim == 1:
            return False
        if rule == "dino_except_tokens":
            return not any(t in jax.tree_util.keystr(path) for t in _TOKENS)
        return True

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config, num_steps: int, epoch_steps: int) -> tuple[Any, dict]:
    """Clipping (:func:`gradient_clipping`), then AdamW with linear warm-up + cosine decay
    and a cosine weight-decay schedule on the parameters :func:`decay_mask` selects.

    The learning rate scales linearly with the batch: ``base_lr * batch_size / 256``.
    """
    o = config.optim
    peak = o.base_lr * o.batch_size / 256
    warmup = min(int(round(o.warmup_epochs * epoch_steps)), num_steps - 1)
    if warmup > 0:
        lr = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, num_steps, o.min_lr)
    else:
        lr = optax.cosine_decay_schedule(peak, num_steps, alpha=o.min_lr / peak)
    wd = _cosine(o.weight_decay, o.weight_decay_end, num_steps)
    mask = lambda params: decay_mask(params, o.weight_decay_mask)
    adamw = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=wd, mask=mask)
    chain = optax.chain(gradient_clipping(o), adamw)
    momentum = _cosine(config.teacher.momentum, config.teacher.momentum_end, num_steps)
    schedules = {"lr": lr, "weight_decay": wd, "momentum": momentum}
    if config.loss.name == "dino":
        lc = config.loss
        schedules["teacher_temperature"] = lambda step: losses.dino_teacher_temperature(
            step,
            epoch_steps,
            warmup=lc.warmup_teacher_temperature,
            final=lc.teacher_temperature,
            warmup_epochs=lc.teacher_temperature_warmup_epochs,
        )
    # DINO's cancel_gradients_last_layer: the head's last layer is held while epoch <
    # freeze_last_layer (whole epochs: epoch = step // epoch_steps).
    freeze_steps = int(round(o.freeze_last_layer_epochs * epoch_steps))
    if o.freeze_last_layer_epochs and config.model.head == "dino":
        schedules["last_layer_frozen"] = lambda step: step < freeze_steps
    return chain, schedules


def is_last_layer(path) -> bool:
    """Whether a parameter path (``jax.tree_util`` keys) is in a DINO head's last layer
    (DINO's ``"last_layer" in name``)."""
    return any(getattr(k, "key", None) == "last_layer" for k in path)


def hold_last_layer(tree, frozen: jax.Array) -> Any:
    """``tree`` (gradients or updates) with the last layer's leaves zeroed when ``frozen``.

    Zeroing the gradients keeps the Adam moments of those parameters at zero, zeroing the
    updates keeps weight decay off them: together what DINO's ``p.grad = None`` does (torch's
    AdamW skips a parameter without a gradient)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.where(frozen, jnp.zeros_like(x), x) if is_last_layer(path) else x,
        tree,
    )


def create_model(config) -> models.SSLModel:
    return models.create_model(config.model, rngs=nnx.Rngs(config.seed))


def create_train_state(config, optimizer) -> tuple[Any, TrainState]:
    """Random-init parameters (a function of ``config.seed``) and a fresh optimiser state."""
    graphdef, variables = nnx.split(create_model(config))
    params = nnx.to_pure_dict(variables)
    teacher = jax.tree.map(jnp.copy, params) if config.teacher.ema else None
    center = None
    if config.loss.name == "dino":  # DINOLoss's register_buffer("center", zeros(1, out_dim))
        center = jnp.zeros((config.model.projector_dim,), jnp.float32)
    state = TrainState(jnp.zeros((), jnp.int32), params, teacher, optimizer.init(params), center)
    return graphdef, state


def abstract_train_state(config, optimizer, mesh) -> tuple[Any, TrainState, Any]:
    """``(graphdef, abstract state, shardings)`` without allocating any parameter.

    The abstract state holds ``jax.ShapeDtypeStruct``s carrying their shardings (FSDP or
    replicated), the target that checkpoints restore into.
    """
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: create_model(config)))
    shapes = jax.eval_shape(lambda: create_train_state(config, optimizer)[1])
    return (graphdef, *_placed(config, shapes, mesh))


def abstract_params(config, mesh) -> tuple[Any, Any, Any]:
    """``(graphdef, abstract parameters, shardings)`` of one model (the student's or the
    teacher's), laid out as in :func:`abstract_train_state`, without an optimiser."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: create_model(config)))
    shapes = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.split(create_model(config))[1]))
    return (graphdef, *_placed(config, shapes, mesh))


def _placed(config, shapes, mesh) -> tuple[Any, Any]:
    """``(abstract, shardings)``: ``shapes`` with their FSDP or replicated shardings (a
    function of each leaf's shape: a subtree is laid out as in the whole state)."""
    shardings = (
        sharding_lib.fsdp_shardings(shapes, mesh)
        if config.train.fsdp
        else jax.tree.map(lambda _: sharding_lib.replicated(mesh), shapes)
    )
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    return abstract, shardings


def init_train_state(config, optimizer, shardings, *, encoder=None) -> TrainState:
    """The random-init state, created directly in its (possibly sharded) layout.

    ``encoder``: parameters that replace the random encoder's in the student and the teacher
    (:func:`imported_encoder`); the heads stay random.
    """
    state = jax.jit(lambda: create_train_state(config, optimizer)[1], out_shardings=shardings)()
    if encoder is None:
        return state
    params = _with_encoder(state.params, encoder, shardings.params)
    teacher = state.teacher
    if teacher is not None:
        teacher = _with_encoder(teacher, encoder, shardings.teacher)
    return state.replace(params=params, teacher=teacher)


def _with_encoder(params, encoder, shardings) -> Any:
    # jaxlib ships no annotations for its compiled pytree module: PyTreeDef is unresolved.
    if jax.tree.structure(encoder) != jax.tree.structure(params["encoder"]):  # type: ignore[operator]
        raise ValueError("encoder does not have the structure of the model's encoder.")
    return {**params, "encoder": jax.device_put(encoder, shardings["encoder"])}


def imported_encoder(config) -> Any:
    """The encoder's parameters read from ``model.init_from`` (``matching_gap.export``)."""
    encoder, skipped = export.read_encoder(config.model)
    note = f", skipping {', '.join(skipped)} (not the encoder's)" if skipped else ""
    metrics.log(f"The encoder starts from {config.model.init_from}{note}.")
    return encoder


def encoder_params(config, state) -> Any:
    """The evaluated encoder: the EMA teacher when there is one (as DINO), else the student."""
    return state.teacher if config.teacher.ema else state.params


def restore_encoder(config, workdir: str, mesh=None) -> tuple[Any, Any, int]:
    """``(graphdef, params, step)``: the evaluated encoder of the newest checkpoint of
    ``workdir`` (the EMA teacher's when the run had one), laid out on ``mesh`` (default: all
    devices) as in training. Only those parameters and the step are read from the
    checkpoint, not the other model's nor the optimiser state. With no checkpoint,
    ``model.init_from``'s encoder (a timm or Hugging Face ViT), at step 0."""
    mesh = sharding_lib.make_mesh() if mesh is None else mesh
    graphdef, abstract, shardings = abstract_params(config, mesh)
    if not checkpointing.has_checkpoints(workdir) and config.model.init_from:
        encoder = imported_encoder(config)
        random = lambda: nnx.to_pure_dict(nnx.split(create_model(config))[1])
        params = jax.jit(random, out_shardings=shardings)()
        return graphdef, _with_encoder(params, encoder, shardings), 0
    if not checkpointing.has_checkpoints(workdir):
        raise errors.WorkdirError(
            f"No checkpoint in {workdir}/checkpoints: train there first, "
            "or point --workdir at a training run."
        )
    which = "teacher" if config.teacher.ema else "params"  # the TrainState field
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding_lib.replicated(mesh))
    ckpt = checkpointing.Checkpointer(workdir, read_only=True)
    try:
        restored = ckpt.restore_latest({"step": step, which: abstract}, partial=True)
    finally:
        ckpt.close()
    if restored is None:
        raise errors.WorkdirError(f"No checkpoint in {workdir}/checkpoints could be listed.")
    return graphdef, restored[which], int(restored["step"])
