from multitune.config.loader import ConfigError, dump_config, load_config, validate_config
from multitune.config.schema import RunConfig, TaskConfig

__all__ = [
    "ConfigError",
    "RunConfig",
    "TaskConfig",
    "dump_config",
    "load_config",
    "validate_config",
]
