"""Evaluate a trained model on the test split:
`python eval.py --workdir DIR [--config FILE[:ARGS]] [--step N] [--split NAME]`.

Restores the newest checkpoint (or --step N) and evaluates every test example once. The
config is the one train.py wrote to DIR/config.json unless --config is given (it must
agree with DIR/config.json on the model's parameters; --config.FIELD=VALUE overrides
either, e.g. --config.data.data_dir). The last line on stdout is one JSON object:
`accuracy` and `loss` for classification, `bits_per_byte` (and `loss` in nats) for the
byte LM. The segment LM (`task: segment_lm`, configs/lm_adaptive_span.py) reads the split
in order with its caches (the paper's full evaluation) and also reports `spans`, the
learned span z per layer and head in tokens, printed per layer on the lines before.
Pretrained weights without training: `python eval.py --config FILE[:ARGS]
--config.init_from=SOURCE` (no --workdir) evaluates SOURCE (a registry name, a checkpoint
file or a workdir; `zoo.checkpoints.load`, with `init_dont_load` and `init_strict`) in the
config's model; its JSON line has "step": null and "init_from".
Errors are one line `error: ...` on stderr (exit status 1); nothing is written.
"""

import json
import os

from absl import flags, logging

from zoo import cli

_CONFIG, _WORKDIR = cli.define_flags("DIR/config.json, written by train.py")
cli.define_distributed_flags()
flags.adopt_module_key_flags(cli)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate (e.g. test, validation).")


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _check_against_workdir(config, workdir: str) -> None:
  """A given --config must build the model whose parameters the workdir holds."""
  from zoo.training import checkpoint  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    saved = json.load(f)
  def parameters(cfg):
    return _flatten({"task": cfg.get("task"),
                     "model": checkpoint.architecture(dict(cfg.get("model") or {}))})
  given = json.loads(config.to_json())
  a, b = parameters(saved), parameters(given)
  differing = [f"{k} ({a.get(k)!r} there, {b.get(k)!r} given)"
               for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
  if differing:
    cli.fail(f"--config disagrees with {path} on {', '.join(differing)}; leave --config out "
             f"to use the workdir's config")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console
  cli.initialize_distributed()
  config = _CONFIG.value
  from zoo import training  # pylint: disable=import-outside-toplevel  (after flag parsing)
  if (config.get("init_from") and flags.FLAGS.workdir is None
      and not cli.config_from_workdir()):
    print(f"evaluating the weights of init_from={config.init_from} (pretrained, untrained "
          f"here; pass --workdir to evaluate a trained run)", flush=True)
    try:
      model, record = training.pretrained_model(config)
      metrics = training.evaluate(model, config, _SPLIT.value, progress=True)
    except (ValueError, OSError) as e:
      cli.fail(e)
    print(json.dumps({"step": None, "split": _SPLIT.value, "init_from": record["source"],
                      "sha256": record["sha256"], **metrics}), flush=True)
    return
  workdir = cli.workdir()
  cli.require_workdir(workdir)
  if not cli.config_from_workdir():
    _check_against_workdir(config, workdir)
  try:
    model, step = training.restore_model(config, workdir, _STEP.value)
    metrics = training.evaluate(model, config, _SPLIT.value, progress=True)
  except (ValueError, OSError) as e:
    cli.fail(e)
  for layer, spans in enumerate(metrics.get("spans", [])):
    print(f"layer {layer} spans per head: " + " ".join(f"{z:.1f}" for z in spans), flush=True)
  print(json.dumps({"step": step, "split": _SPLIT.value, **metrics}), flush=True)


if __name__ == "__main__":
  cli.run(main, default_config=cli.workdir_config)
