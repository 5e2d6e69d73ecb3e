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

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="mg_jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    """The default suite's tests compile far more than they compute: there, LLVM's
    optimisations of the CPU code cost more compile time than they save (XLA's own HLO passes
    still run); the 5 min 12 s of the default suite were 6 min 59 s with them. The slow
    checks train and evaluate on whole splits and keep them. Set before any JAX backend
    starts (in every pytest-xdist worker too)."""
    default_suite = config.getoption("markexpr", "") == "not slow and not slice"
    flags = os.environ.get("XLA_FLAGS", "")
    if default_suite and "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
