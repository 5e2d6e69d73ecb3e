"""Device mesh and shardings: the batch split over all devices; parameters replicated, or
sharded FSDP-style (``train.fsdp``: :func:`fsdp_shardings`); OT groups solved per device.

Built on ``jax.sharding`` alone. The mesh has one axis, ``"data"``, spanning every device of
every process; with one CPU it is a 1-device mesh and the same code path runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from matching_gap.losses import AUX_REDUCTIONS

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes).

    Auto axis types: OTT's Sinkhorn raises ShardingTypeError on batch-sharded inputs under
    the Explicit default of ``jax.make_mesh``; with Auto, XLA inserts the all-gather that a
    global OT problem needs.
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# Arrays smaller than this stay replicated under FSDP: gathering them costs more than it saves.
FSDP_MIN_SIZE = 2**14


def fsdp_shardings(tree, mesh: Mesh, min_size: int | None = None):
    """Shards each large array of ``tree`` over the data axis along its largest divisible
    dimension (FSDP / ZeRO-3 style); small arrays and those with no divisible dimension stay
    replicated. XLA inserts the all-gathers and reduce-scatters this layout needs.

    ``tree`` may hold arrays or ``jax.ShapeDtypeStruct``s; returns a tree of shardings.
    """

    min_size = FSDP_MIN_SIZE if min_size is None else min_size

    def spec(x):
        shape = getattr(x, "shape", ())
        if not shape or np.prod(shape) < min_size:
            return replicated(mesh)
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % mesh.size == 0:
                axes = [None] * len(shape)
                axes[dim] = DATA_AXIS
                return NamedSharding(mesh, PartitionSpec(*axes))
        return replicated(mesh)

    return jax.tree.map(spec, tree)


def global_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's slice of the batch -> one global array sharded over the mesh."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local)


def model_inputs(batch: dict, mesh: Mesh):
    """A data batch (``matching_gap.data``) as the train step takes it, split over ``mesh``:
    the images (the device cuts the views), or the dict of host-cut ``views`` and
    ``local_views``."""
    if "image" in batch:
        return global_batch(batch["image"], mesh)
    keys = [k for k in ("views", "local_views") if k in batch]
    return {k: global_batch(batch[k], mesh) for k in keys}


def per_device_groups(
    loss_fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, dict]], mesh: Mesh
) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, dict]]:
    """Runs a grouped OT loss on each device's own groups, with no traffic in the solver.

    ``loss_fn(student [V, n, d], targets [K, n, d])`` must average independent problems
    over groups of consecutive items whose size divides the per-device batch: then each
    device holds whole groups, solves them alone (one Sinkhorn loop per device whose
    stopping test sees only its own groups), and the results are averaged across devices
    once at the end. The value equals ``loss_fn`` on the whole batch.

    ``shard_map``'s replication check is off: OTT's solver does not pass it.
    """
    spec = PartitionSpec(None, DATA_AXIS)
    reduce = {
        "all": lambda v, axis: jax.lax.pmin(v.astype(jnp.int32), axis).astype(bool),
        "max": jax.lax.pmax,
        "mean": jax.lax.pmean,
    }

    def local(student, targets):
        value, aux = loss_fn(student, targets)
        aux = {k: reduce[AUX_REDUCTIONS.get(k, "mean")](v, DATA_AXIS) for k, v in aux.items()}
        return jax.lax.pmean(value, DATA_AXIS), aux

    def wrapped(student, targets):
        value, aux = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(spec, spec),
            out_specs=PartitionSpec(),
            check_vma=False,
        )(student, targets)
        return value, aux

    return wrapped
