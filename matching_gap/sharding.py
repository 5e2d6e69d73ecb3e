"""Device mesh and shardings: the batch is split over all devices, parameters replicated.

Built on ``jax.sharding`` alone. The mesh has one axis, ``"data"``, spanning every device of
every process; with one CPU it is a 1-device mesh and the same code path runs.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices.

    Auto axis types: OTT's Sinkhorn raises ShardingTypeError on batch-sharded inputs under
    the Explicit default of ``jax.make_mesh``; with Auto, XLA inserts the all-gather that a
    global OT problem needs.
    """
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's slice of the batch -> one global array sharded over the mesh."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local)
