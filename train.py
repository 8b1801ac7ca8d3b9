r"""Trains an image classifier with synchronized BatchNorm, on one host or several.

  python train.py                                      # configs/default.py: the article's CNN
  python train.py --config configs/resnet.py --workdir runs/resnet
  python train.py --config.norm=flax                   # A/B: Flax's BatchNorm
  python train.py --config.api=nnx                     # the NNX models and training path
  python train.py --config configs/smoke.py --config.num_epochs=1 --workdir /tmp/smoke

Running again with the same --workdir resumes from its latest checkpoint (a finished run is
evaluated and reported, nothing written). Faults end in one line, `train.py: error: ...`;
with several processes, exit status 3 when a peer never joined (--distributed_timeout) and 4
when one was lost mid-run (rerun every process to resume).

Several processes (e.g. two on one machine; on several hosts use process 0's address):

  python train.py --coordinator_address 127.0.0.1:12345 --num_processes 2 --process_id 0 &
  python train.py --coordinator_address 127.0.0.1:12345 --num_processes 2 --process_id 1

or, under SLURM / Open MPI / Kubernetes / Cloud TPU, `python train.py --distributed`.
"""

import logging as std_logging
import os
import sys

# glibc's allocator returns every large freed block to the OS, so each XLA:CPU step
# page-faults its fresh outputs back in. Keeping freed memory in the heap made the
# CNN train step 2.0x and a 300-step train.py run 59 s -> 36 s faster on the 2-core
# CPU (benchmarks/studies/cpu_settings.py, benchmarks/README.md); the cost is that the
# process keeps its peak memory. Applied by re-executing once, before JAX loads;
# set GLIBC_TUNABLES yourself (even to "") to opt out.
MALLOC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"
if sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ:
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES))

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)  # so that configs can `from configs import default`

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and plot go here (default: runs/<config>_<norm>[_nnx]).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for several processes.")
flags.DEFINE_integer("num_processes", None, "Number of processes (several hosts).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_bool("distributed", False, "Join a cluster found by JAX's auto-detection (SLURM, MPI, ...).")
flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for every process to join.")


def _unknown_field(e: Exception):
    """Exits with ml_collections' message for an unknown --config.FIELD, unescaped: it arrives as
    an AttributeError wrapping a KeyError whose text is "'field'\\nDid you mean ...?"."""
    while isinstance(e, BaseException) and e.args:
        e = e.args[0]  # the innermost message, not the repr() that str(KeyError) gives
    field, _, hint = str(e).partition("\n")
    field = field.strip().strip("'\"")
    given = " ".join(a for a in sys.argv[1:] if a.startswith(f"--config.{field}")) or f"--config.{field}"
    hint = " ".join(hint.split())
    sys.exit(f"train.py: error: unknown config field '{field}' ({given}). "
             + (f"{hint} " if hint else "")
             + "Every --config.FIELD must be a field of the config file's get_config().")


try:  # ml_collections applies overrides of the default config file here...
    config_flags.DEFINE_config_file(
        "config", os.path.join(_HERE, "configs", "default.py"),
        "Training config: a configs/*.py file; override fields with --config.FIELD=VALUE.",
        lock_config=True)
except (KeyError, AttributeError) as e:
    _unknown_field(e)


def _parse_flags(argv):
    try:  # ...and those of a --config file given on the command line here.
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError) as e:
        _unknown_field(e)


def _quiet(record) -> bool:
    """Drops what means nothing to a user: orbax's INFO chatter (a dozen lines per checkpoint),
    other libraries' tracebacks of a full disk or of a collective that a lost peer broke
    (train.py: error: says it in one line), and JAX's report that it found no TPU on a machine
    without one; keeps every other warning and jaxbn's own lines."""
    if "/orbax/" in record.pathname and (record.levelno < std_logging.WARNING
                                         or "Given directory is read only" in record.getMessage()):
        return False  # the latter: a finished run is evaluated without writing, on purpose
    own = record.pathname.startswith(os.path.join(_HERE, "jaxbn", "")) or record.pathname == __file__
    if record.levelno >= std_logging.WARNING and not own:
        # orbax's and asyncio's reports of the writes that failed (from their threads, and when
        # their futures are collected), each with a traceback.
        from jaxbn.training.workdir import is_disk_full
        if is_disk_full(Exception(record.getMessage())) or (
                record.exc_info and record.exc_info[1] is not None and is_disk_full(record.exc_info[1])):
            return False
        # orbax's report of a save whose collective failed because a peer died (from its thread,
        # with a traceback): train.py: error: names the lost process in one line.
        from jaxbn.training import distributed
        if distributed.watching() and record.exc_info and record.exc_info[1] is not None \
                and distributed.is_peer_failure(record.exc_info[1]):
            return False
    if record.levelno < std_logging.WARNING and record.name.startswith("jax._src.xla_bridge"):
        return not record.getMessage().startswith("Unable to initialize backend")
    return True


def _unraisable(unraisable) -> None:
    """Drops the "Event loop is closed" errors that tensorstore's write callbacks raise after a
    checkpoint save failed (e.g. on a full disk) and orbax closed its event loop; they say
    nothing that train.py: error: does not, once per pending write. Others go to Python's hook."""
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def _kept(workdir: str) -> str:
    """What a lost peer leaves: the last complete checkpoint of `workdir` (a sentence)."""
    ckpts = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = sorted(int(d) for d in (os.listdir(ckpts) if os.path.isdir(ckpts) else []) if d.isdigit())
    if not steps:
        return f"No checkpoint was written yet in {ckpts}; the rerun starts from step 0. "
    return f"The last complete checkpoint, step {steps[-1]} in {ckpts}, is intact. "


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.get_absl_handler().addFilter(_quiet)
    sys.unraisablehook = _unraisable
    # Before any other JAX call.
    from jaxbn.training import checkpoints, config as config_lib, datasets, distributed, loop, metrics
    from jaxbn.training import workdir as workdir_lib

    distributed.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                       timeout_s=FLAGS.distributed_timeout, auto_detect=FLAGS.distributed)
    config = FLAGS.config
    workdir = FLAGS.workdir
    if workdir is None:
        name = os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0]
        api = "" if config.get("api", "linen") == "linen" else f"_{config.api}"
        workdir = os.path.join("runs", f"{name}_{config.norm}{api}")
    distributed.watch_peers(lambda: _kept(workdir))
    try:
        _, summary = loop.train_and_evaluate(config, workdir)
    except (config_lib.ConfigError, checkpoints.CheckpointError, datasets.DataError,
            workdir_lib.WorkdirError, metrics.MetricsError) as e:
        sys.exit(f"train.py: error: {e}")
    except Exception as e:  # pylint: disable=broad-except
        distributed.exit_if_peer_lost(e)  # a collective failed because a process died: one line
        raise
    distributed.finish_watch()  # peers still finishing must not take this process for lost
    if summary["stopped"]:
        print(f"Stopped at step {summary['step']} (config.stop_after_steps); run again to resume.")
        return
    if summary.get("already_finished"):
        orig = summary["original"]
        wall = "-" if orig.get("wall_time_s") is None else f"{orig['wall_time_s']:.1f} s"
        print(f"Nothing to train: {os.path.abspath(workdir)} holds this run, finished after "
              f"{summary['step']} steps (a new --workdir starts another). Its last checkpoint: test "
              f"accuracy {100 * summary['test_accuracy']:.2f}% ({summary['test_examples']} test images); "
              f"the run that trained it: wall time {wall}, {orig.get('images_per_sec') or 0:.0f} images/s, "
              f"{orig.get('nonfinite_steps') or 0} non-finite step(s) skipped", flush=True)
        return
    print(f"Final test accuracy: {100 * summary['test_accuracy']:.2f}% ({summary['test_examples']} "
          f"test images) after {summary['step']} steps; wall time {summary['wall_time_s']:.1f} s; "
          f"{summary['images_per_sec'] or 0:.0f} images/s; {summary['nonfinite_steps']} non-finite "
          f"step(s) skipped; workdir {os.path.abspath(workdir)}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
