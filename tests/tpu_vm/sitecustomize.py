"""The TPU-VM check made true, in the processes of a simulated Cloud TPU VM worker only.

``tests/simulated_slice.py`` puts this folder on the ``PYTHONPATH`` of a simulated worker's
commands and nowhere else. On a real TPU VM, ``import jax`` runs ``cloud_tpu_init``, which
finds the TPU chips, sets ``jax._src.cloud_tpu_init.running_in_cloud_tpu_vm`` and leaves
``TPU_SKIP_MDS_QUERY`` unset: JAX's cluster detection then asks the GCE metadata server. On
this CPU machine it finds no chip, so right after ``cloud_tpu_init`` has run this sets the
flag and unsets the variable, as a TPU VM has them. Nothing else changes: the devices stay
the CPU's (the worker's environment sets ``JAX_PLATFORMS=cpu``), and the metadata server is
the one ``GCE_METADATA_IP`` names.
"""

import importlib.abc
import importlib.machinery
import os
import sys

_MODULE = "jax._src.cloud_tpu_init"


class _AfterCloudTpuInit(importlib.abc.MetaPathFinder):
    """Finds JAX's module as Python would, and wraps its ``cloud_tpu_init`` once loaded."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _MODULE:
            return None
        sys.meta_path.remove(self)  # once
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            cloud_tpu_init = module.cloud_tpu_init

            def as_on_a_tpu_vm():
                cloud_tpu_init()
                module.running_in_cloud_tpu_vm = True
                os.environ.pop("TPU_SKIP_MDS_QUERY", None)

            module.cloud_tpu_init = as_on_a_tpu_vm

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AfterCloudTpuInit())
