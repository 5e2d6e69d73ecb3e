"""Pretraining: a pure jitted train step and the thin loop (the train state, the model and
the optimiser are built by ``matching_gap.state``).

``train_and_evaluate(config, workdir)`` builds the model, optimiser and data, resumes from the
newest checkpoint in ``workdir`` if any, trains, checkpoints, logs metrics and finally runs
the evaluators (``matching_gap.evaluation``). The objective (which views meet which) lives in
``matching_gap.objectives``, checkpoint policy in ``matching_gap.checkpointing``.

Randomness is a function of ``(config.seed, step)`` and the data order of
``(config.seed, step)`` too, so a resumed run sees the same batches and views as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from matching_gap import (
    augment,
    checkpointing,
    data,
    errors,
    health,
    launch,
    metrics,
    monitor,
    objectives,
    pictures,
    schema,
)
from matching_gap import sharding as sharding_lib
from matching_gap import state as state_lib
from matching_gap.evaluation import features as features_lib
from matching_gap.evaluation import knn, suite


class NonFiniteLossError(errors.UserError, RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """How a call to :func:`train_and_evaluate` ended."""

    step: int  # the step the run stopped at (it has a checkpoint)
    num_steps: int  # the step the run trains to
    results: dict  # the final evaluation ({} when stopped early or with final_eval off)

    @property
    def finished(self) -> bool:
        return self.step >= self.num_steps


# -------------------------------------------------------------------------- train step


def _forward_views(model, views: jax.Array, key: jax.Array | None) -> dict:
    """Runs the model on ``views [V, b, h, w, c]`` as one batch; outputs are [V, b, ...].

    The batch is merged image-major, ``[b, V] -> [b * V]``: with ``b`` split over the
    devices each device's share of the merged batch is its own images' views, so the
    encoder runs on 1/N of the batch per device. Merging view-major (``[V * b]``) gives a
    layout XLA can only hold by gathering every view onto every device (N times the work).
    """
    v, b = views.shape[:2]
    merged = jnp.swapaxes(views, 0, 1).reshape((b * v,) + views.shape[2:])
    out = model(merged, key=key)
    return {k: jnp.swapaxes(x.reshape((b, v) + x.shape[1:]), 0, 1) for k, x in out.items()}


def make_train_step(config, graphdef, optimizer, schedules: dict, mesh=None):
    """Returns ``train_step(state, batch) -> (state, metrics)``, pure and jittable.

    ``batch``: images ``[b, H, W, c]`` held in memory, or a dict of views cut on the host
    (``views`` ``[b, V, S, S, c]``, ``local_views``), as ``sharding.model_inputs`` gives them.

    The student sees every view; the targets are the global views through the EMA teacher
    (no gradient) or through the student itself. After the update the teacher moves to
    ``m * teacher + (1 - m) * new student`` with ``m`` the momentum schedule.
    """
    aug_config = config.augment
    ema = bool(config.teacher.ema)
    base_key = jax.random.key(config.seed)
    objective = objectives.make_objective(config, mesh)
    dino = config.loss.name == "dino"
    freeze = "last_layer_frozen" in schedules

    def train_step(state: state_lib.TrainState, batch):
        aug_key, drop_key = jax.random.split(jax.random.fold_in(base_key, state.step))
        global_views, local_views = augment.views_for(aug_key, batch, aug_config)

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
            if dino:
                value, aux = objective(
                    student, targets, center=state.center, teacher_temperature=temp
                )
            else:
                value, aux = objective(student, targets)
            features = jax.lax.stop_gradient(out["features"][0])
            return value, {**aux, _RANK: health.effective_rank(features)}

        temp = schedules["teacher_temperature"](state.step) if dino else None
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        center = aux.pop("center") if dino else state.center
        frozen = schedules["last_layer_frozen"](state.step) if freeze else None
        if frozen is not None:
            grads = state_lib.hold_last_layer(grads, frozen)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        if frozen is not None:
            updates = state_lib.hold_last_layer(updates, frozen)
        params = optax.apply_updates(state.params, updates)
        teacher = state.teacher
        if ema:
            m = schedules["momentum"](state.step)
            teacher = jax.tree.map(lambda t, p: m * t + (1.0 - m) * p, teacher, params)
        out_metrics = {
            "train/loss": loss,
            "train/lr": schedules["lr"](state.step),
            "train/weight_decay": schedules["weight_decay"](state.step),
            "train/grad_norm": optax.tree.norm(grads),
            "train/param_norm": optax.tree.norm(params),
        }
        if ema:
            out_metrics["train/teacher_momentum"] = schedules["momentum"](state.step)
        if dino:
            out_metrics["train/teacher_temperature"] = temp
        if frozen is not None:
            out_metrics["train/last_layer_frozen"] = frozen.astype(jnp.float32)
        out_metrics["health/effective_rank"] = aux.pop(_RANK)
        for name, value in aux.items():
            group = "sinkhorn" if name in _SINKHORN_KEYS else "train"
            out_metrics[f"{group}/{name}"] = value
        if config.loss.name in ("matching_gap", "m3g"):
            out_metrics[f"train/{config.loss.name}"] = loss
        new_state = state_lib.TrainState(state.step + 1, params, teacher, opt_state, center)
        return new_state, out_metrics

    return train_step


def jit_train_step(
    config, graphdef, optimizer, schedules, mesh, state_sharding, *, donate: bool = True
):
    """The jitted train step: state in its layout, the batch split over the mesh, metrics
    replicated. ``donate``: the step reuses the input state's buffers for the new state
    (the caller must not touch the old state afterwards), which halves the state's memory."""
    return jax.jit(
        make_train_step(config, graphdef, optimizer, schedules, mesh),
        in_shardings=(state_sharding, sharding_lib.batch_sharding(mesh)),
        out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
        donate_argnums=0 if donate else (),
    )


_SINKHORN_KEYS = ("converged", "sinkhorn_iterations", "marginal_error", "epsilon")
# The effective rank (RankMe) of the student's features of the first global view.
_RANK = "effective_rank"


# --------------------------------------------------------------------------- the loop


def _agree(local: bool) -> bool:
    """One decision for all processes: process 0's (a no-op with one process)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(local)))


class LostProcessError(errors.UserError, RuntimeError):
    """Another process of a multi-process run is gone (its host stopped or was preempted):
    this one cannot go on alone. ``exit_at_once``: the command exits without waiting for
    collectives or exit handlers that would wait for the lost process."""

    exit_at_once = True


# What a collective or the coordination service says when a peer process is gone.
_LOST_PROCESS_WORDS = (
    "Connection reset by peer",
    "Connection refused",
    "Broken pipe",
    "Socket closed",
    "heartbeat",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "Gloo",
    "NCCL",
)


@contextlib.contextmanager
def _lost_process_ends_run(ckpt: checkpointing.Checkpointer):
    """In a multi-process run, turns a collective that failed because another process is
    gone into :class:`LostProcessError` (one line, and how to resume)."""
    try:
        yield
    except Exception as e:
        # A save that failed on a collective (Orbax's barriers) is a lost process too.
        cause = e.__cause__ if isinstance(e, checkpointing.CheckpointWriteError) else e
        text = str(cause)
        if (
            jax.process_count() == 1
            or isinstance(cause, errors.UserError)
            or not any(w in text for w in _LOST_PROCESS_WORDS)
        ):
            raise
        written = ckpt.last_written
        saved = (
            f"the checkpoint of step {written} (or a newer one) is safe"
            if written is not None
            else "no checkpoint was written yet: the run starts again"
        )
        reason = " ".join(text.split())[:200]
        raise LostProcessError(
            launch.lost_process_message(
                jax.process_index(),
                jax.process_count(),
                saved=saved,
                detail=f"({type(cause).__name__}: {reason})",
            )
        ) from e


def _check_finite(step_metrics: list[tuple[int, dict]]) -> None:
    for step, m in step_metrics:
        if not math.isfinite(float(m["train/loss"])):
            raise NonFiniteLossError(
                f"Non-finite loss ({float(m['train/loss'])}) at step {step}. The last good "
                "checkpoint is kept; lower the learning rate, raise loss.epsilon or check "
                "the input data, then rerun to resume from it."
            )


def train_and_evaluate(config: schema.Config, workdir: str, *, devices=None):
    """Trains (resuming from ``workdir``), then evaluates. Returns a :class:`TrainResult`.

    ``config``: a :class:`schema.Config` (or a ConfigDict, parsed here). ``devices``: the
    devices to run on (default: all devices of all processes). Everything that can be
    checked (config, data, workdir) is checked before anything is written.
    """
    stopwatch = monitor.Stopwatch()
    config = schema.parse(config)
    mesh = sharding_lib.make_mesh(devices)
    schema.check_devices(config, mesh.size)
    data_config = config.data
    train_set, num_examples = data.training_split(data_config)
    name = data_config.name if train_set is None else train_set.name
    data.check_batch_fits(num_examples, config.optim.batch_size, name)
    epoch_steps = state_lib.steps_per_epoch(config, num_examples)
    num_steps = state_lib.total_steps(config, num_examples)
    monitor.check_settings(config, num_steps)
    optimizer, schedules = state_lib.make_optimizer(config, num_steps, epoch_steps)
    graphdef, abstract_state, state_sharding = state_lib.abstract_train_state(
        config, optimizer, mesh
    )
    features = features_lib.SplitFeatures(config, graphdef, mesh)
    if config.train.final_eval or config.train.knn_every:
        features.splits()  # missing evaluation data fails now, not after training
    knn_suite = [knn.KnnEvaluator(config, features)]  # every train.knn_every steps
    checkpointing.check_workdir(workdir, config)
    encoder = None  # a resumed run continues from its checkpoint, whatever model.init_from says
    if config.model.init_from and not checkpointing.has_checkpoints(workdir):
        # a file that does not fit fails before any write
        encoder = state_lib.imported_encoder(config)
    checkpointing.write_config(workdir, config)
    ckpt = checkpointing.Checkpointer(
        workdir, every=config.train.checkpoint_every, keep=config.train.keep_checkpoints
    )
    with stopwatch.measure("checkpoint"):
        state = ckpt.restore_latest(abstract_state)
    start_step = 0 if state is None else int(state.step)
    if state is None:
        state = state_lib.init_train_state(config, optimizer, state_sharding, encoder=encoder)
    writer = metrics.create_writer(workdir, resume_step=start_step)

    train_step = jit_train_step(config, graphdef, optimizer, schedules, mesh, state_sharding)
    metrics.log(
        f"Training with {config.loss.name} for {num_steps} steps ({epoch_steps} per "
        f"epoch, {num_examples} examples, batch {config.optim.batch_size}) on "
        f"{mesh.size} {mesh.devices.flat[0].platform} device(s)."
    )
    batches = data.train_iterator(
        data_config,
        train_set,
        batch_size=config.optim.batch_size,
        seed=config.seed,
        start_step=start_step,
        augment=config.augment,
    )
    progress = monitor.Progress(
        config,
        workdir,
        writer,
        stopwatch,
        num_devices=mesh.size,
        device_kind=monitor.device_kind(config, mesh),
        start_step=start_step,
        num_steps=num_steps,
    )
    profiler = monitor.Profiler(config, workdir, start_step)
    compiled_step = None  # compiled at the first step, its time measured apart
    plan_batch = None  # the transport-plan pictures: single-process matching-gap runs
    if config.train.plan_every and config.loss.name == "matching_gap":
        if jax.process_count() == 1:
            plan_batch = pictures.make_plan_batch(config, graphdef)
        else:
            metrics.log(
                "train.plan_every: transport-plan images are written by single-process "
                "runs only; skipped."
            )
    pending, time_limit = [], config.train.time_limit_minutes * 60
    stopwatch.mark_startup()
    with checkpointing.preemption_notice() as preempted, _lost_process_ends_run(ckpt):
        for step in range(start_step + 1, num_steps + 1):
            with stopwatch.measure("input_wait"):
                images = sharding_lib.model_inputs(next(batches), mesh)
            if compiled_step is None:
                with stopwatch.measure("compile"):
                    compiled_step = train_step.lower(state, images).compile()
            profiler.before(step)
            state, step_metrics = compiled_step(state, images)
            pending.append((step, step_metrics))
            with stopwatch.measure("other"):
                profiler.after(step, state)
            log = step % config.train.log_every == 0
            stop = (
                step == num_steps
                or step - start_step == config.train.run_steps
                or preempted(step)
                or (log and time_limit > 0 and _agree(progress.seconds() > time_limit))
            )
            save = stop or ckpt.due(step)
            if log or save:  # never checkpoint a state that follows a NaN: check first
                fetched, pending = jax.device_get(pending), []
                _check_finite(fetched)
                ckpt.check()  # a failed save ends the run here, not at the next save
                progress.write(step, fetched, stopping=stop)
            if save:
                with stopwatch.measure("checkpoint"):
                    state = ckpt.save(step, state, force=stop)
            if stop:
                break
            if config.train.knn_every and step % config.train.knn_every == 0:
                with stopwatch.measure("evaluation"):
                    results = suite.run(knn_suite, state_lib.encoder_params(config, state))
                writer.write_scalars(step, results)
                metrics.log(f"step {step} | {metrics.format_results(results)}")
            if plan_batch is not None and step % config.train.plan_every == 0:
                with stopwatch.measure("other"):
                    views, student, targets = jax.device_get(
                        plan_batch(state.params, state.teacher, images, step)
                    )
                    images_out = pictures.plan_images(config, views, student, targets)
                    writer.write_images(step, {f"plan/{k}": v for k, v in images_out.items()})
                    pictures.save_latest(workdir, images_out)
    with stopwatch.measure("other"):
        profiler.finish(state)  # a stop inside the profiled range keeps what was traced
    progress.finish_training()
    with stopwatch.measure("checkpoint"):
        ckpt.close()
    final_step = int(state.step)

    results = {}
    if final_step < num_steps:
        stopped = (
            f"at step {final_step} of {num_steps} with a checkpoint; rerun the same command "
            "to resume."
        )
        if jax.process_count() == 1:
            metrics.log(f"Stopped {stopped}")
        else:  # every host's log shows the step it saved
            print(
                f"Process {jax.process_index()} of {jax.process_count()} stopped {stopped}",
                flush=True,
            )
        progress.close(print_table=True)
        writer.close()
        return TrainResult(final_step, num_steps, results)
    random_params = None
    if config.train.compare_random_init and (config.train.final_eval or config.train.pictures):
        init = state_lib.init_train_state(config, optimizer, state_sharding)
        random_params = state_lib.encoder_params(config, init)
    if config.train.final_eval:
        with stopwatch.measure("evaluation"):
            evaluators = suite.monitor(config, features)
            results = suite.run(evaluators, state_lib.encoder_params(config, state))
            if random_params is not None:
                results.update(suite.run(evaluators, random_params, prefix="eval/random_init_"))
            if config.train.compare_raw_pixels:
                pixels = features_lib.SplitFeatures(config, graphdef, mesh, raw_pixels=True)
                pixels_suite = suite.monitor(config, pixels)
                results.update(suite.run(pixels_suite, None, prefix="eval/raw_pixels_"))
        writer.write_scalars(final_step, results)
        suite.print_summary(results)
    if config.train.pictures:
        if jax.process_count() == 1:
            pictures.write_pictures(
                config, graphdef, state_lib.encoder_params(config, state), random_params, workdir
            )
        else:
            metrics.log(
                "train.pictures: pictures are drawn by single-process runs only "
                "(--mode=pictures on one host draws them from the checkpoint)."
            )
    progress.close(print_table=True)
    writer.close()
    return TrainResult(final_step, num_steps, results)
