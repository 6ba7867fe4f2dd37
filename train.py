"""Train a model from a config: `python train.py [--config FILE[:ARGS]] [--workdir DIR]`.

With no flags it trains the default job, a ViT with ReLU attention on the embedded digits
data (configs/vit_digits.py). A workdir that already holds checkpoints resumes from the
newest one; Ctrl-C (or SIGTERM) saves a checkpoint and stops; run again to continue.
`python -m zoo.attention` lists the configs with their arguments and the attentions.

The last line on stdout is one JSON object: {"status": "done" | "interrupted", "step": N,
"eval": {the last evaluation's metrics}}. Bad flags, configs and data fail with one line
`error: ...` on stderr (exit status 1) before anything is written.
"""

import json

from absl import flags, logging

from zoo import cli

_CONFIG, _WORKDIR = cli.define_flags("configs/vit_digits.py")
cli.define_distributed_flags()
flags.adopt_module_key_flags(cli)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console
  cli.initialize_distributed()
  from zoo import training  # pylint: disable=import-outside-toplevel  (after flag parsing)
  from zoo.training import optim  # pylint: disable=import-outside-toplevel
  config, workdir = _CONFIG.value, cli.workdir()
  try:
    training.validate_config(config)  # before the workdir is touched
    optim.validate(config.optimizer, int(config.total_steps))
    print(f"workdir: {workdir}", flush=True)
    result = training.train(config, workdir)
  except (ValueError, OSError, training.NonFiniteLossError) as e:
    cli.fail(e)
  print(f"{result['status']} at step {result['step']}", flush=True)
  print(json.dumps({"status": result["status"], "step": result["step"], **result}), flush=True)
  if result["status"] == "interrupted":
    raise SystemExit(130)


if __name__ == "__main__":
  cli.run(main)
