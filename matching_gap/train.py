"""Pretraining: a pure jitted train step and the thin loop that drives it.

``train_and_evaluate(config, workdir)`` builds the model, optimiser and data, resumes from the
newest checkpoint in ``workdir`` if any, trains, checkpoints, logs metrics and finally runs
the evaluators (k-NN and linear probe, for the trained and the random-init encoder).

Randomness is a function of ``(config.seed, step)`` and the data order of
``(config.seed, step)`` too, so a resumed run sees the same batches and views as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, struct

from matching_gap import augment, config_lib, data, evaluators, losses, metrics, models
from matching_gap import sharding as sharding_lib


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # student parameters (pure dict)
    teacher: Any  # EMA teacher parameters, or None with shared weights
    opt_state: Any


# ------------------------------------------------------------------------------ set-up


def steps_per_epoch(config: ml_collections.ConfigDict, num_examples: int) -> int:
    return max(num_examples // config.optim.batch_size, 1)


def total_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
    if config.optim.num_steps > 0:
        return int(config.optim.num_steps)
    return max(int(round(config.optim.num_epochs * steps_per_epoch(config, num_examples))), 1)


def _cosine(start: float, end: float, steps: int) -> Callable[[jax.Array], jax.Array]:
    def schedule(step):
        frac = jnp.clip(step / max(steps, 1), 0.0, 1.0)
        return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule


def make_optimizer(config, num_steps: int, epoch_steps: int) -> tuple[Any, dict]:
    """AdamW with linear warm-up + cosine decay, a cosine weight-decay schedule and clipping.

    Biases, norms, the CLS token and position embeddings get no weight decay (as DINO).
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

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: (
                x.ndim > 1
                and not any(
                    name in jax.tree_util.keystr(path) for name in ("pos_embed", "cls_token")
                )
            ),
            params,
        )

    # Clipping stays in the chain when off (an infinite norm) so that the optimiser state
    # has one structure whatever the setting, and checkpoints restore across it.
    clip = optax.clip_by_global_norm(o.grad_clip if o.grad_clip > 0 else float("inf"))
    chain = [clip, optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=wd, mask=decay_mask)]
    momentum = _cosine(config.teacher.momentum, config.teacher.momentum_end, num_steps)
    return optax.chain(*chain), {"lr": lr, "weight_decay": wd, "momentum": momentum}


def create_model(config) -> models.SSLModel:
    if config.model.image_size != config.augment.crop_size:
        raise ValueError(
            f"model.image_size ({config.model.image_size}) must equal augment.crop_size "
            f"({config.augment.crop_size}): the model sees the crops."
        )
    if config.model.channels != config.data.channels:
        raise ValueError(
            f"model.channels ({config.model.channels}) must equal data.channels "
            f"({config.data.channels})."
        )
    return models.create_model(config.model, rngs=nnx.Rngs(config.seed))


def create_train_state(config, optimizer) -> tuple[Any, TrainState]:
    """Random-init parameters (a function of ``config.seed``) and a fresh optimiser state."""
    graphdef, params = nnx.split(create_model(config))
    params = nnx.to_pure_dict(params)
    teacher = jax.tree.map(jnp.copy, params) if config.teacher.ema else None
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        teacher=teacher,
        opt_state=optimizer.init(params),
    )
    return graphdef, state


# -------------------------------------------------------------------------------- loss


def _pairs(num_student: int, num_global: int, ema: bool) -> list[tuple[int, int]]:
    """(student view, target view) pairs. Targets are global views (DINO: the teacher
    sees only global crops). With shared weights each unordered global pair counts once."""
    return [
        (a, b)
        for a in range(num_student)
        for b in range(num_global)
        if a != b and (ema or a > b or a >= num_global)
    ]


def _vmapped_mean(loss_fn, *stacked: jax.Array) -> tuple[jax.Array, dict]:
    """Mean of ``loss_fn`` over the leading axis of its inputs, as one vmapped computation.

    For the OT losses this runs a single Sinkhorn loop for all view pairs instead of one
    loop per pair (many small sequential loops would dominate an accelerator step).
    """
    values, aux = jax.vmap(loss_fn)(*stacked)
    return jnp.mean(values), losses.reduce_aux(aux)


def ssl_loss(loss_config, student: jax.Array, targets: jax.Array, *, ema: bool):
    """The configured loss on embeddings, averaged over view pairs.

    Args:
      student: [V, n, d] student embeddings (predictions), the K global views first.
      targets: [K, n, d] target embeddings of the K global views: the EMA teacher's
        projections (stop-gradient) or, with shared weights, the student's own.
      ema: whether targets come from a teacher.

    Returns:
      ``(value, aux)``.
    """
    lc = loss_config
    num_views, num_global = student.shape[0], targets.shape[0]
    if ema:
        targets = jax.lax.stop_gradient(targets)
    pairs = _pairs(num_views, num_global, ema or lc.name == "byol")
    a_idx = np.array([a for a, _ in pairs])
    b_idx = np.array([b for _, b in pairs])
    sinkhorn_options = {
        "threshold": lc.sinkhorn_threshold,
        "max_iterations": lc.sinkhorn_max_iterations,
    }
    ot_kwargs = dict(
        epsilon=lc.epsilon, normalize=lc.normalize, relative_epsilon=lc.relative_epsilon or None,
        group_size=lc.group_size or None, sinkhorn_options=sinkhorn_options,
    )  # fmt: skip
    if lc.name == "matching_gap":
        fn = lambda x, y: losses.matching_gap(x, y, cost=lc.cost, **ot_kwargs)
        return _vmapped_mean(fn, student[a_idx], targets[b_idx])
    if lc.name == "m3g":
        if not ema:
            return losses.multi_marginal_matching_gap(student, **ot_kwargs)
        if num_views != num_global:
            raise ValueError("loss m3g with an EMA teacher takes global views only: set "
                             "augment.num_local_crops=0.")  # fmt: skip
        # Each student view with the teacher's other views: [K, K, n, d].
        others = np.array([[m for m in range(num_global) if m != a] for a in range(num_global)])
        tuples = jnp.concatenate([student[:, None], targets[others]], axis=1)
        fn = lambda views: losses.multi_marginal_matching_gap(views, **ot_kwargs)
        return _vmapped_mean(fn, tuples)
    if lc.name == "info_nce":
        if not ema and num_views == num_global and lc.multiview_mode == "one_vs_rest":
            return losses.multiview_info_nce(student, temperature=lc.temperature,
                                             mode="one_vs_rest")  # fmt: skip
        fn = lambda x, y: losses.info_nce(x, y, temperature=lc.temperature)
        return _vmapped_mean(fn, student[a_idx], targets[b_idx])
    if lc.name == "byol":
        # Without a teacher the targets are the student's own projections (SimSiam); the
        # loss stops their gradient either way.
        if num_views == num_global and lc.multiview_mode == "one_vs_rest":
            return losses.multiview_byol(student, targets, mode="one_vs_rest")
        return _vmapped_mean(losses.byol_loss, student[a_idx], targets[b_idx])
    raise ValueError(f"Unknown loss.name {lc.name!r}; valid: {list(config_lib.LOSSES)}.")


# -------------------------------------------------------------------------- train step


def _forward_views(model, views: jax.Array, key: jax.Array | None) -> dict:
    """Runs the model on ``views [V, b, h, w, c]`` as one batch; outputs are [V, b, ...]."""
    v, b = views.shape[:2]
    out = model(views.reshape((v * b,) + views.shape[2:]), key=key)
    return {k: x.reshape((v, b) + x.shape[1:]) for k, x in out.items()}


def make_loss_fn(config, mesh=None):
    """``loss_fn(student [V, b, d], targets [K, b, d]) -> (value, aux)`` for the config.

    With a mesh of several devices and OT groups that divide the per-device batch, each
    device solves its own groups (:func:`sharding.per_device_groups`); otherwise the OT
    problems are solved on the gathered embeddings.
    """
    ema = bool(config.teacher.ema)
    loss_fn = functools.partial(ssl_loss, config.loss, ema=ema)
    lc = config.loss
    if mesh is None or mesh.size == 1 or lc.name not in ("matching_gap", "m3g"):
        return loss_fn
    local_batch, rest = divmod(config.optim.batch_size, mesh.size)
    if lc.group_size and not rest and local_batch % lc.group_size == 0:
        return sharding_lib.per_device_groups(loss_fn, mesh)
    return loss_fn


def make_train_step(config, graphdef, optimizer, schedules: dict, mesh=None):
    """Returns ``train_step(state, images) -> (state, metrics)``, pure and jittable."""
    aug_config = augment.AugmentConfig.from_config(config.augment)
    ema = bool(config.teacher.ema)
    base_key = jax.random.key(config.seed)
    loss_config = config.loss
    loss_of_embeddings = make_loss_fn(config, mesh)

    def train_step(state: TrainState, images: jax.Array):
        step_key = jax.random.fold_in(base_key, state.step)
        aug_key, drop_key = jax.random.split(step_key)
        views = augment.make_views(aug_key, images, aug_config)
        global_views, local_views = views if isinstance(views, tuple) else (views, None)

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            keys = jax.random.split(drop_key, 2)
            out = _forward_views(model, global_views, keys[0])
            student = out["predictions"]
            if local_views is not None:
                local = _forward_views(model, local_views, keys[1])["predictions"]
                student = jnp.concatenate([student, local])
            if ema:
                teacher = nnx.merge(graphdef, state.teacher)
                targets = _forward_views(teacher, global_views, None)["projections"]
            else:
                targets = out["projections"]
            return loss_of_embeddings(student, targets)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        teacher = state.teacher
        if ema:
            m = schedules["momentum"](state.step)
            teacher = jax.tree.map(lambda t, p: m * t + (1.0 - m) * p, teacher, params)
        new_state = TrainState(
            step=state.step + 1, params=params, teacher=teacher, opt_state=opt_state
        )
        out_metrics = {
            "train/loss": loss,
            "train/lr": schedules["lr"](state.step),
            "train/weight_decay": schedules["weight_decay"](state.step),
            "train/grad_norm": optax.global_norm(grads),
            "train/param_norm": optax.global_norm(params),
        }
        if ema:
            out_metrics["train/teacher_momentum"] = schedules["momentum"](state.step)
        for name, value in aux.items():
            group = "sinkhorn" if name in _SINKHORN_KEYS else "train"
            out_metrics[f"{group}/{name}"] = value
        if loss_config.name in ("matching_gap", "m3g"):
            out_metrics[f"train/{loss_config.name}"] = loss
        return new_state, out_metrics

    return train_step


_SINKHORN_KEYS = ("converged", "sinkhorn_iterations", "marginal_error", "epsilon")


# ------------------------------------------------------------------------- checkpoints


def _checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)  # fmt: skip


def _restore(manager: ocp.CheckpointManager, target: TrainState, workdir: str):
    """The newest checkpoint that restores, or None when there is none.

    A checkpoint that fails to read (partial or corrupt files) is moved aside to
    ``<workdir>/corrupt_checkpoints/<step>`` with a warning and the previous one is tried;
    if none fits, the error says why (typically: written by a different config).
    """
    errors = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state = manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # noqa: BLE001 (any read failure: try the previous step)
            errors.append((step, e))
            continue
        for bad_step, error in errors:
            _quarantine(workdir, bad_step, error)
        if errors:
            manager.reload()
        _log(f"Resumed from the checkpoint at step {step} in {workdir}.")
        return state
    if errors:
        step, error = errors[0]
        raise ValueError(
            f"No checkpoint in {workdir}/checkpoints could be restored into the current "
            f"config (model, teacher or optimiser differ?). Newest (step {step}): "
            f"{str(error)[:800]} ... Use a new --workdir, or the settings the checkpoints were "
            "written with."
        ) from error
    return None


def _quarantine(workdir: str, step: int, error: Exception) -> None:
    """Moves an unreadable checkpoint out of the way, keeping its files."""
    source = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
    target_dir = os.path.join(os.path.abspath(workdir), "corrupt_checkpoints")
    target = os.path.join(target_dir, f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
        os.makedirs(target_dir, exist_ok=True)
        os.rename(source, target)
    _log(f"WARNING: the checkpoint at step {step} could not be read ({type(error).__name__}: "
         f"{str(error)[:200]}); moved to {target}, falling back to an older one.")  # fmt: skip


def _check_workdir_config(workdir: str, config) -> None:
    """Refuses to resume from a workdir whose checkpoints belong to a different model."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json_best_effort())
    checkpoints = os.path.join(workdir, "checkpoints")
    has_checkpoints = os.path.isdir(checkpoints) and any(
        name.isdigit() for name in os.listdir(checkpoints)
    )
    if has_checkpoints and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        keys = ("model", "teacher")
        changed = [
            f"{section}.{k}: {saved.get(section, {}).get(k)!r} -> {v!r}"
            for section in keys
            for k, v in current[section].items()
            if saved.get(section, {}).get(k) != v and k not in ("dtype", "remat", "attention")
        ]
        if changed:
            raise ValueError(
                f"{workdir} holds checkpoints of a different model ({'; '.join(changed)}). "
                "Use a new --workdir, or restore the original settings to resume."
            )
    elif jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(current, f, indent=2)


# --------------------------------------------------------------------------- the loop


def _load_split(config, split: str, max_examples: int) -> data.Dataset:
    """One labelled split in memory; on ``tfds.testing.mock_data`` when ``data.mock``."""
    cfg = ml_collections.ConfigDict(config.data.to_dict())
    cfg.max_examples = max_examples
    if not config.data.mock:
        return data.load_split(cfg, split)
    import tensorflow_datasets as tfds

    # Only around the loading: the mock also patches file access that Orbax relies on.
    with tfds.testing.mock_data(num_examples=config.data.mock_num_examples):
        return data.load_split(cfg, split)


def _train_iterator(config, dataset, start_step: int):
    if config.data.in_memory:
        return data.train_batches(
            dataset, batch_size=config.optim.batch_size, seed=config.seed,
            start_step=start_step, process_index=jax.process_index(),
            process_count=jax.process_count(),
        )  # fmt: skip
    return data.iterate_tfds(
        config.data, config.data.train_split,
        batch_size=config.optim.batch_size // jax.process_count(), seed=config.seed,
        start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count(),
    )  # fmt: skip


def _num_train_examples(config, dataset) -> int:
    if dataset is not None:
        return len(dataset)
    import tensorflow_datasets as tfds

    builder = tfds.builder(config.data.name, data_dir=config.data.data_dir or None)
    n = builder.info.splits[config.data.train_split].num_examples
    return min(n, config.data.max_examples) if config.data.max_examples else n


@dataclasses.dataclass
class _Progress:
    """Host-side bookkeeping between log lines: throughput, ETA, non-finite detection."""

    batch_size: int
    start_step: int
    num_devices: int
    pending: list = dataclasses.field(default_factory=list)
    t0: float = dataclasses.field(default_factory=time.perf_counter)
    last_time: float = 0.0
    last_step: int = 0

    def __post_init__(self):
        self.last_time, self.last_step = self.t0, self.start_step

    def flush(self, step: int) -> dict:
        """Fetches pending metrics; raises on the first non-finite loss."""
        fetched = jax.device_get(self.pending)
        self.pending = []
        for s, m in fetched:
            if not math.isfinite(float(m["train/loss"])):
                raise NonFiniteLossError(
                    f"Non-finite loss ({float(m['train/loss'])}) at step {s}. The last "
                    "good checkpoint is kept; lower the learning rate, raise loss.epsilon "
                    "or check the input data, then rerun to resume from it."
                )
        if not fetched:
            return {}
        now = time.perf_counter()
        steps = step - self.last_step
        rate = steps * self.batch_size / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        out = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
        out["train/images_per_second"] = rate
        out["train/images_per_second_per_device"] = rate / self.num_devices
        return out


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s")  # fmt: skip


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict:
    """Trains (resuming from ``workdir``), then evaluates. Returns the final metrics.

    ``devices``: the devices to run on (default: all devices of all processes).
    """
    if config.loss.name not in config_lib.LOSSES:
        raise ValueError(f"Unknown loss.name {config.loss.name!r}; valid: {config_lib.LOSSES}.")
    mesh = sharding_lib.make_mesh(devices)
    if config.optim.batch_size % mesh.size:
        raise ValueError(
            f"optim.batch_size ({config.optim.batch_size}) must be divisible by the number of "
            f"devices ({mesh.size})."
        )
    _check_workdir_config(workdir, config)
    writer = metrics.MetricWriter(workdir)

    train_set = None
    if config.data.in_memory:
        train_set = _load_split(config, config.data.train_split, config.data.max_examples)
    num_examples = _num_train_examples(config, train_set)
    epoch_steps = steps_per_epoch(config, num_examples)
    num_steps = total_steps(config, num_examples)
    optimizer, schedules = make_optimizer(config, num_steps, epoch_steps)
    graphdef, state = create_train_state(config, optimizer)
    init_params = state.teacher if config.teacher.ema else state.params

    manager = _checkpoint_manager(workdir, config)
    state = _restore(manager, state, workdir) or state
    replicated = sharding_lib.replicated(mesh)
    state_sharding = sharding_lib.fsdp_shardings(state, mesh) if config.train.fsdp else replicated
    state = jax.device_put(state, state_sharding)
    start_step = int(state.step)

    train_step = jax.jit(
        make_train_step(config, graphdef, optimizer, schedules, mesh),
        in_shardings=(state_sharding, sharding_lib.batch_sharding(mesh)),
        out_shardings=(state_sharding, replicated),
    )
    evaluate = _make_evaluate(config, graphdef, mesh)
    _log(
        f"Training with {config.loss.name} for {num_steps} steps ({epoch_steps} per epoch, "
        f"{num_examples} examples, batch {config.optim.batch_size}) on "
        f"{mesh.size} {mesh.devices.flat[0].platform} device(s)."
    )

    batches = _train_iterator(config, train_set, start_step)
    progress = _Progress(config.optim.batch_size, start_step, mesh.size)
    time_limit = config.train.time_limit_minutes * 60
    with _preemption_notice() as preempted:
        for step in range(start_step, num_steps):
            images = sharding_lib.global_batch(next(batches)["image"], mesh)
            state, step_metrics = train_step(state, images)
            progress.pending.append((step + 1, step_metrics))
            stop = (
                step + 1 == num_steps
                or (time_limit and time.perf_counter() - progress.t0 > time_limit)
                or step + 1 - start_step == config.train.run_steps
                or preempted(step + 1)
            )
            if (step + 1) % config.train.log_every == 0 or stop:
                logged = progress.flush(step + 1)
                elapsed = time.perf_counter() - progress.t0
                eta = elapsed / (step + 1 - start_step) * (num_steps - step - 1)
                writer.write(step + 1, logged)
                _log(
                    f"step {step + 1}/{num_steps} | loss {logged['train/loss']:.4f} | "
                    f"{logged['train/images_per_second']:.0f} img/s | ETA {_format_eta(eta)}"
                )
            if (step + 1) % config.train.checkpoint_every == 0 or stop:
                progress.flush(step + 1)  # never checkpoint a state that follows a NaN
                manager.save(step + 1, args=ocp.args.StandardSave(state))
            if stop:
                break
            if config.train.knn_every and (step + 1) % config.train.knn_every == 0:
                # Let a checkpoint write finish first: mocked TFDS loading patches file access.
                manager.wait_until_finished()
                results = evaluate(state, probe=False)
                writer.write(step + 1, results)
                _log(f"step {step + 1} | {_format_results(results)}")
    manager.wait_until_finished()
    manager.close()
    final_step = int(state.step)

    results = {}
    if final_step < num_steps:
        _log(f"Stopped at step {final_step} of {num_steps} with a checkpoint; rerun the same "
             "command to resume.")  # fmt: skip
    elif config.train.final_eval:
        results = evaluate(state, probe=True)
        if config.train.compare_random_init:
            init = TrainState(step=state.step, params=init_params, teacher=init_params,
                              opt_state=None)  # fmt: skip
            random_results = evaluate(init, probe=True)
            results.update({k.replace("eval/", "eval/random_init_"): v
                            for k, v in random_results.items()})  # fmt: skip
        writer.write(final_step, results)
        _print_summary(results)
    return results


@contextlib.contextmanager
def _preemption_notice():
    """Yields ``preempted(step) -> bool``: whether to checkpoint and stop after this step.

    One process: SIGTERM (the usual preemption notice) sets a flag. Several processes:
    JAX's coordination service (which receives SIGTERM on every host) picks one common
    step, so that all processes save the same checkpoint and stop together.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        yield multihost_utils.reached_preemption_sync_point
        return
    received = []

    def handler(signum, frame):
        del frame
        received.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield lambda step: False  # signals reach the main thread only
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield lambda step: bool(received)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _log(message: str) -> None:
    """Progress lines on stdout, from process 0 only."""
    if jax.process_index() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _format_results(results: dict) -> str:
    return " | ".join(f"{k} {v:.4f}" for k, v in results.items())


def _print_summary(results: dict) -> None:
    lines = ["", "Linear probe and k-NN top-1 on the evaluation split:"]
    for kind in ("linear_probe_top1", "knn_top1"):
        trained = results.get(f"eval/{kind}")
        random_init = results.get(f"eval/random_init_{kind}")
        if trained is None:
            continue
        line = f"  {kind:<18} trained {100 * trained:6.2f}%"
        if random_init is not None:
            line += f" | random init {100 * random_init:6.2f}%"
        lines.append(line)
    _log("\n".join(lines))


def _make_encode(config, graphdef) -> Callable[[Any, jax.Array], jax.Array]:
    """Jitted ``encode(params, images) -> features``: the evaluation view (centre crop,
    normalisation), then ``config.eval.features`` of the encoder."""
    aug_config = augment.AugmentConfig.from_config(config.augment)

    @jax.jit
    def encode(params, images):
        model = nnx.merge(graphdef, params)
        return model.encode(augment.center_view(images, aug_config), config.eval.features)

    return encode


def _make_evaluate(config, graphdef, mesh):
    """``evaluate(state, probe) -> {"eval/knn_top1": ..., "eval/linear_probe_top1": ...}``.

    Evaluates the teacher when there is one (as DINO), else the student. The labelled
    splits are loaded on first use and kept.
    """
    encode = _make_encode(config, graphdef)
    cache = {}

    def splits():
        if not cache:
            n = config.data.eval_max_examples
            cache["train"] = _load_split(config, config.data.eval_train_split, n)
            cache["test"] = _load_split(config, config.data.eval_split, n)
            if cache["train"].num_classes != cache["test"].num_classes:
                raise ValueError(
                    f"The evaluation splits {config.data.eval_train_split!r} and "
                    f"{config.data.eval_split!r} have {cache['train'].num_classes} and "
                    f"{cache['test'].num_classes} classes; they need the same classes (an "
                    "image folder needs the same class sub-folders in every split)."
                )
        return cache["train"], cache["test"]

    def evaluate(state: TrainState, *, probe: bool) -> dict:
        params = state.teacher if config.teacher.ema else state.params
        train_set, test_set = splits()
        encode_fn = lambda images: encode(params, images)
        bs = config.eval.batch_size
        train_feats = evaluators.extract_features(encode_fn, train_set, batch_size=bs)
        test_feats = evaluators.extract_features(encode_fn, test_set, batch_size=bs)
        knn_n = config.eval.knn_train_examples or len(train_feats)
        out = {
            "eval/knn_top1": evaluators.knn_accuracy(
                train_feats[:knn_n], train_set.labels[:knn_n], test_feats, test_set.labels,
                num_classes=train_set.num_classes, k=config.eval.knn_k,
                temperature=config.eval.knn_temperature,
            )
        }  # fmt: skip
        if probe:
            out["eval/linear_probe_top1"] = evaluators.linear_probe_accuracy(
                train_feats, train_set.labels, test_feats, test_set.labels,
                num_classes=train_set.num_classes, epochs=config.eval.probe_epochs,
                batch_size=config.eval.probe_batch_size, learning_rate=config.eval.probe_lr,
                weight_decay=config.eval.probe_weight_decay, seed=config.seed,
            )  # fmt: skip
        return out

    return evaluate


def _restore_for_inference(config, workdir: str) -> tuple[Any, TrainState]:
    """``(graphdef, state)`` of the newest checkpoint in ``workdir`` (no training)."""
    optimizer, _ = make_optimizer(config, 2, 1)
    graphdef, state = create_train_state(config, optimizer)
    manager = _checkpoint_manager(workdir, config)
    state = _restore(manager, state, workdir)
    manager.close()
    if state is None:
        raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints: train there first, "
                                "or point --workdir at a training run.")  # fmt: skip
    return graphdef, state


def evaluate_workdir(config, workdir: str) -> dict:
    """Runs the final evaluators on the newest checkpoint of ``workdir`` (no training)."""
    graphdef, state = _restore_for_inference(config, workdir)
    results = _make_evaluate(config, graphdef, sharding_lib.make_mesh())(state, probe=True)
    metrics.MetricWriter(workdir).write(int(state.step), results)
    _print_summary(results)
    return results


def load_encoder(workdir: str) -> tuple[Callable[[Any], jax.Array], ml_collections.ConfigDict]:
    """The newest checkpoint of a training run as a frozen feature extractor.

    Reads the config the run saved (``<workdir>/config.json``), restores the newest
    checkpoint and returns ``(encode, config)``. ``encode(images)`` maps images
    ``[N, H, W, C]`` (uint8, or floats in [0, 1]) of the stored size
    ``config.data.image_size`` to features ``[N, D]``: the evaluation view (centre crop,
    normalisation), then ``config.eval.features`` of the encoder (the EMA teacher's when the
    run had one), as the k-NN and linear-probe evaluators see them. A run trained with
    ``model.attention='cudnn'`` is read with XLA's attention on a machine without a GPU.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} the --workdir of a training run?")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.model.get("attention") == "cudnn" and jax.default_backend() != "gpu":
        config.model.attention = "xla"  # the same function of the same parameters
    graphdef, state = _restore_for_inference(config, workdir)
    params = state.teacher if config.teacher.ema else state.params
    size, channels = config.data.image_size, config.data.channels
    _encode = _make_encode(config, graphdef)

    def encode(images) -> jax.Array:
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (size, size, channels):
            raise ValueError(f"encode expects images [N, {size}, {size}, {channels}] (the size "
                             f"the model was trained on), got {images.shape}.")  # fmt: skip
        return _encode(params, images)

    return encode, config
