"""Recipes: the schema with its algorithm table (`schema`), reading YAML and overrides (`loading`), the generated
key reference (`reference`)."""

from train.config.loading import apply_override, check_trainer_keys, load_recipe, parse_override, recipe_to_dict
from train.config.schema import (
    ALGORITHMS,
    Algorithm,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LoraSection,
    MetaRewardingConfig,
    Recipe,
    SamplingConfig,
    ScoreConfig,
    ScpoConfig,
    algorithm,
    check_launch,
)
from train.errors import ConfigError

__all__ = [
    "ALGORITHMS", "Algorithm", "ConfigError", "DataConfig", "EvalConfig", "LoggingConfig", "LoraSection",
    "MetaRewardingConfig", "Recipe", "SamplingConfig", "ScoreConfig", "ScpoConfig", "algorithm", "apply_override",
    "check_launch", "check_trainer_keys", "load_recipe", "parse_override", "recipe_to_dict",
]  # fmt: skip
