"""``--mode=export``: the evaluated encoder of a run written as timm or Hugging Face files
(the formats themselves are ``matching_gap.export``).
"""

from __future__ import annotations

import jax

from matching_gap import checkpointing, errors, export, metrics, schema, state


def export_workdir(config, workdir: str) -> list[str]:
    """``--mode=export``: the evaluated encoder of the newest checkpoint of ``workdir`` (the EMA
    teacher's when the run had one; with no checkpoint, ``model.init_from``'s) as
    ``export.format`` files in ``export.dir`` (``matching_gap.export``). Returns their paths.
    """
    config = schema.parse(config)
    settings, model_config = config.export, config.model
    export.check_exportable(model_config, settings.format)  # before restoring anything
    if not settings.dir:
        raise errors.ConfigError(
            "--mode=export writes into export.dir: set --config.export.dir=OUT."
        )
    checkpointing.check_workdir(workdir, config)
    _, params, step = state.restore_encoder(config, workdir)
    encoder = jax.device_get(params["encoder"])
    paths = []
    if jax.process_index() == 0:
        paths = export.write_encoder(
            encoder,
            model_config,
            settings.format,
            settings.dir,
            preprocessing=export.preprocessing(config),
        )
        which = "EMA teacher" if config.teacher.ema else "encoder"
        metrics.log(
            f"Wrote the {which} of step {step} as {settings.format} files: {', '.join(paths)}."
        )
    return paths
