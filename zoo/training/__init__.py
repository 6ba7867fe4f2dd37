"""Training and evaluation: optimiser, tasks, checkpoints and the trainer loop."""

from zoo.training.trainer import (NonFiniteLossError, evaluate, pretrained_model,
                                  restore_model, train, validate_config)
from zoo.training.workdir import UserError

__all__ = ["NonFiniteLossError", "UserError", "evaluate", "pretrained_model", "restore_model",
           "train", "validate_config"]
