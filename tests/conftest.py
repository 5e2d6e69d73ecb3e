"""Four simulated CPU devices for every test (set before any JAX computation).

The multi-device tests compare a 4-device mesh with a 1-device mesh in one process; the
others simply run on the 4-device mesh, as a multi-GPU machine would.
"""

import jax

jax.config.update("jax_num_cpu_devices", 4)
