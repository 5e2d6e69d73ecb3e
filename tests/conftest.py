"""The CPU only, four simulated CPU devices for every test (set before any JAX
computation), and one compilation cache for the session.

The multi-device tests compare a 4-device mesh with a 1-device mesh in one process; the
others simply run on the 4-device mesh, as a multi-GPU machine would. Many tests compile
the same smoke train step: JAX's persistent cache compiles it once per session.
"""

import os
import tempfile

# The tests run on the CPU. Where libtpu is installed (the `tpu` extra, for the plan tests)
# JAX would otherwise probe for a TPU and print libtpu's start-up lines into every
# subprocess's stderr; the plan tests get TPU devices from libtpu compile-only anyway.
os.environ["JAX_PLATFORMS"] = "cpu"

# Most tests compile far more than they compute: LLVM's optimisations of the CPU code cost
# more compile time than they save at run time here (XLA's own HLO passes still run).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = flags.strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="mg_jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
