"""Typed configs of every job and the one YAML loader (DESIGN.md §6.3)."""

from mvcustom.configs.base import ConfigError, dump_config, flatten, from_dict, load_config, to_dict
from mvcustom.configs.evaluate import EvaluateConfig
from mvcustom.configs.preprocess import PreprocessConfig
from mvcustom.configs.sample_data import SampleDataConfig
from mvcustom.configs.train import TrainConfig

JOB_CONFIGS = {
    "make_sample_data": SampleDataConfig,
    "preprocess": PreprocessConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
}

__all__ = [
    "JOB_CONFIGS",
    "ConfigError",
    "EvaluateConfig",
    "PreprocessConfig",
    "SampleDataConfig",
    "TrainConfig",
    "dump_config",
    "flatten",
    "from_dict",
    "load_config",
    "to_dict",
]
