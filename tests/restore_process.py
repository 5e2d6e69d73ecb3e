"""One process of the two-process restore tests (tests/test_storage.py): joins
``jax.distributed`` on 127.0.0.1 with gloo CPU collectives, restores the newest checkpoint of
``--workdir`` through ``checkpointing.Checkpointer`` and prints ``RESTORED <step> <w[0]>``.

``--unreadable=3,4`` makes this process fail to read those steps (an injected read error, as
a host whose reads of the bucket fail would see), without touching the files.

    python tests/restore_process.py --workdir=DIR --port=P --process_id=I [--unreadable=S,...]
"""

import argparse

import jax

from matching_gap import checkpointing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--unreadable", default="")
    args = parser.parse_args()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{args.port}", num_processes=2, process_id=args.process_id
    )
    checkpointing.RESTORE_RETRY_SECONDS = 0.0
    unreadable = {int(s) for s in args.unreadable.split(",") if s}
    read = checkpointing.Checkpointer._restore_step

    def restore_step(self, step, target, **kwargs):
        if step in unreadable:
            return None, OSError(f"injected read failure of step {step}")
        return read(self, step, target, **kwargs)

    checkpointing.Checkpointer._restore_step = restore_step
    mesh = jax.sharding.Mesh(jax.devices(), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    target = {"w": jax.ShapeDtypeStruct((4,), "float32", sharding=replicated)}
    ckpt = checkpointing.Checkpointer(args.workdir, read_only=True)
    state = ckpt.restore_latest(target)
    ckpt.close()
    w = jax.device_get(state["w"].addressable_data(0))
    print(f"RESTORED {int(round(float(w[0])))} {w.tolist()}", flush=True)


if __name__ == "__main__":
    main()
