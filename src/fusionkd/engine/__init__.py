"""The training engine: config schema, training loop, checkpoints, optimizers, progress display."""

from .checkpoint import CheckpointError, atomic_save, build_deploy_model, load_checkpoint
from .config import AugmentConfig, Config, ConfigError, resolve_config
from .trainer import NonFiniteLossError, RunResult, Trainer

__all__ = ["AugmentConfig", "CheckpointError", "Config", "ConfigError", "NonFiniteLossError", "RunResult",
           "Trainer", "atomic_save", "build_deploy_model", "load_checkpoint", "resolve_config"]
