"""Forward + backward time of the demo's model and of variants of it, side by side.

    python benchmarks/encoder_step.py                  # the demo's variants on 512 views
    python benchmarks/encoder_step.py --views=256 --rounds=5

Each variant is the model of ``configs/default.py`` with some ``model.*`` fields changed;
the timed function is the gradient of a scalar of the projections of ``--views`` random
28x28 images (the encoder + projector part of a training step, which is nearly all of the
demo's step). Variants are timed in alternating rounds so that a busy machine affects them
alike; the table gives the median and the ratio to the demo's model. A second table times
the demo's model with parts of the block swapped out (GELU's tanh form, ReLU, no attention
core, no MLP): where the step's time goes.
"""

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matching_gap import config_lib, models, schema  # noqa: E402

_VIEWS = flags.DEFINE_integer("views", 512, "Images per timed call (2 views x batch 256).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating timing rounds.")
_CALLS = flags.DEFINE_integer("calls_per_round", 3, "Timed calls per variant per round.")

VARIANTS = {
    "demo (width 64, depth 4, patch 7, mlp 128)": {},
    "patch 4 (49 tokens)": {"patch_size": 4},
    "width 96, depth 3, mlp 192": {"width": 96, "mlp_dim": 192, "depth": 3},
    "width 128, mlp 256": {"width": 128, "mlp_dim": 256},
    "mlp 256": {"mlp_dim": 256},
    "depth 2": {"depth": 2},
    "conv stem, 16 channels": {"stem_channels": 16},
    "BatchNorm heads": {"head_batchnorm": True},
}


def _step(overrides: dict):
    config = config_lib.load_config_file(
        os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
    )
    with config.unlocked():
        config.model.update(overrides)
    graphdef, params = nnx.split(models.create_model(schema.parse(config).model, rngs=nnx.Rngs(0)))
    images = jnp.asarray(np.random.default_rng(0).random((_VIEWS.value, 28, 28, 1)), jnp.float32)

    def loss(p, x):
        return jnp.sum(nnx.merge(graphdef, p)(x)["projections"] ** 2)

    grad = jax.jit(jax.grad(loss))
    jax.block_until_ready(grad(params, images))  # compile
    return lambda: jax.block_until_ready(grad(params, images))


def _time(steps: dict) -> dict[str, float]:
    times = {name: [] for name in steps}
    for _ in range(_ROUNDS.value):
        for name, step in steps.items():
            for _ in range(_CALLS.value):
                t = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def _table(title: str, medians: dict[str, float]) -> None:
    base = next(iter(medians.values()))
    print(f"\n{title}\n\n| variant | forward + backward (ms) | vs the demo's model |")
    print("|---|---:|---:|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x |")


def main(argv):
    del argv
    print(
        f"device: {jax.devices()[0].platform} x{jax.device_count()} | {_VIEWS.value} views "
        f"| median of {_ROUNDS.value} rounds x {_CALLS.value} calls"
    )
    _table("Model variants", _time({name: _step(o) for name, o in VARIANTS.items()}))

    parts = {"demo's model": _step({})}
    gelu = jax.nn.gelu
    attention, mlp = models.Attention.__call__, models.MLP.__call__
    try:
        jax.nn.gelu = lambda x, approximate=False: gelu(x, approximate=True)
        parts["GELU, tanh form"] = _step({})
        jax.nn.gelu = lambda x, approximate=False: jax.nn.relu(x)
        parts["ReLU instead of GELU"] = _step({})
        jax.nn.gelu = gelu
        # The qkv and output projections stay; the scores, softmax and weighted sum go.
        models.Attention.__call__ = lambda self, x: self.proj(self.qkv(x)[..., : x.shape[-1]])
        parts["no attention core"] = _step({})
        models.Attention.__call__ = attention
        models.MLP.__call__ = lambda self, x: x
        parts["no MLP"] = _step({})
    finally:
        jax.nn.gelu, models.Attention.__call__, models.MLP.__call__ = gelu, attention, mlp
    _table("Where the demo's step goes (parts swapped out; not trainable models)", _time(parts))


if __name__ == "__main__":
    app.run(main)
