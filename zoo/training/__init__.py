"""Training and evaluation: optimiser, tasks, checkpoints and the trainer loop."""

from zoo.training.trainer import (NonFiniteLossError, evaluate, restore_model, train,
                                  validate_config)

__all__ = ["NonFiniteLossError", "evaluate", "restore_model", "train", "validate_config"]
