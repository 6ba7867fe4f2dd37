"""Evaluate a trained model on the test split:
`python eval.py --config FILE[:ARGS] --workdir DIR [--step N]`.

Restores the newest checkpoint (or --step N) and evaluates every test example once. The
last line on stdout is one JSON object: `accuracy` and `loss` for classification,
`bits_per_byte` (and `loss` in nats) for the byte LM. The segment LM (`task: segment_lm`,
configs/lm_adaptive_span.py) reads the split in order with its caches (the paper's full
evaluation) and also reports `spans`, the learned span z per layer and head in tokens,
printed per layer on the lines before.
"""

import json
import sys

from absl import app, flags, logging

from zoo import cli

_CONFIG, _WORKDIR = cli.define_flags(default_workdir=None)
cli.define_distributed_flags()
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: newest).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console
  cli.initialize_distributed()
  from zoo import training  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  workdir = _WORKDIR.value or cli.default_workdir(flags.FLAGS["config"].config_filename)
  try:
    model, step = training.restore_model(config, workdir, _STEP.value)
    metrics = training.evaluate(model, config, _SPLIT.value, progress=True)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  for layer, spans in enumerate(metrics.get("spans", [])):
    print(f"layer {layer} spans per head: " + " ".join(f"{z:.1f}" for z in spans), flush=True)
  print(json.dumps({"step": step, "split": _SPLIT.value, **metrics}), flush=True)


if __name__ == "__main__":
  app.run(main)
