"""Train a model from a config: `python train.py [--config FILE[:ARGS]] [--workdir DIR]`.

With no flags it trains the default job, a ViT with ReLU attention on the embedded digits
data (configs/vit_digits.py). A workdir that already holds checkpoints resumes from the
newest one; Ctrl-C (or SIGTERM) saves a checkpoint and stops; run again to continue.
"""

import sys

from absl import app, flags, logging

from zoo import cli

_CONFIG, _WORKDIR = cli.define_flags(default_workdir=None)
cli.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console
  cli.initialize_distributed()
  from zoo import training  # pylint: disable=import-outside-toplevel  (after flag parsing)
  workdir = _WORKDIR.value or cli.default_workdir(flags.FLAGS["config"].config_filename)
  print(f"workdir: {workdir}", flush=True)
  try:
    result = training.train(_CONFIG.value, workdir)
  except (ValueError, FileNotFoundError, training.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"{result['status']} at step {result['step']}: {result['eval']}", flush=True)
  if result["status"] == "interrupted":
    sys.exit(130)


if __name__ == "__main__":
  app.run(main)
