"""Configuration: YAML files, --quick_test overlays and command-line overrides.

A stage's resolved configuration is the model config (configs/models/*.yaml) with, for training stages, the
method's hyperparameters under the key `algorithm` (configs/algorithms/*.yaml). Either file may carry a
`quick_test:` mapping of the same shape, laid over it when --quick_test is given. Overrides come last:
`--set section.key=value` for any key, or a stage's named flags (e.g. --batch_size). An override may only
change a key that exists, and keeps its type, so a typo is an error that names the key, never a silent no-op.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml

MODEL_SECTIONS = ("model", "lora", "data", "training", "generation", "paths")
QUICK_TEST_KEY = "quick_test"


class ConfigError(ValueError):
    """A configuration problem, with a message that names the file or key at fault."""


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict, overlay: dict, where: str = "") -> dict:
    """Return base with overlay laid over it; overlay keys must exist in base (catches typos in overlays)."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        dotted = f"{where}{key}"
        if key not in merged:
            raise ConfigError(f"unknown config key '{dotted}' in quick_test overlay")
        if isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = deep_merge(merged[key], value, f"{dotted}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _with_quick_test(data: dict, quick_test: bool, where: str = "") -> dict:
    overlay = data.get(QUICK_TEST_KEY) or {}
    data = {k: v for k, v in data.items() if k != QUICK_TEST_KEY}
    return deep_merge(data, overlay, where) if quick_test else data


def get_key(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"unknown config key '{dotted}'")
        node = node[part]
    return node


def _coerce(value: Any, current: Any, dotted: str) -> Any:
    """Keep the type of the existing value (ints may become floats; None accepts anything)."""
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(current, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    elif isinstance(current, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(current, str) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    elif isinstance(current, list) and isinstance(value, list):
        return value
    elif isinstance(current, dict) and isinstance(value, dict):
        return value
    raise ConfigError(
        f"config key '{dotted}' expects {type(current).__name__}, got {value!r} ({type(value).__name__})")


def set_key(config: dict, dotted: str, value: Any) -> None:
    current = get_key(config, dotted)  # raises for unknown keys
    parts = dotted.split(".")
    node = config
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = _coerce(value, current, dotted)


def parse_override(text: str) -> tuple[str, Any]:
    """'training.batch_size=8' -> ('training.batch_size', 8); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects KEY=VALUE, got '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(config: dict, overrides: Iterable[str] = (), named: dict[str, Any] | None = None) -> dict:
    config = copy.deepcopy(config)
    for text in overrides:
        key, value = parse_override(text)
        set_key(config, key, value)
    for key, value in (named or {}).items():
        if value is not None:
            set_key(config, key, value)
    return config


def validate_model_config(config: dict, path: str | Path) -> None:
    missing = [s for s in MODEL_SECTIONS if not isinstance(config.get(s), dict)]
    if missing:
        raise ConfigError(f"{path}: missing section(s) {', '.join(missing)}")
    for key in ("model.path", "model.dtype", "data.context_mode", "lora.target_modules"):
        try:
            get_key(config, key)
        except ConfigError:
            raise ConfigError(f"{path}: missing key '{key}'") from None
    if config["data"]["context_mode"] not in ("gold", "full", "retrieved"):
        raise ConfigError(f"{path}: data.context_mode must be gold or full, "
                          f"got '{config['data']['context_mode']}'")


def load_config(model_config: str | Path, algo_config: str | Path | None = None, quick_test: bool = False,
                overrides: Iterable[str] = (), named: dict[str, Any] | None = None) -> dict:
    """The fully resolved configuration of a stage (what its manifest records)."""
    config = _with_quick_test(load_yaml(model_config), quick_test)
    validate_model_config(config, model_config)
    config["model_config_file"] = str(model_config)
    if algo_config is not None:
        config["algorithm"] = _with_quick_test(load_yaml(algo_config), quick_test, "algorithm.")
        config["algo_config_file"] = str(algo_config)
    try:
        return apply_overrides(config, overrides, named)
    except ConfigError as err:
        raise ConfigError(f"{err} (files: {model_config}{', ' + str(algo_config) if algo_config else ''})") from None
