"""Configuration: YAML files, --quick_test overlays and command-line overrides.

A stage's resolved configuration is the model config (configs/models/*.yaml) with, for training stages, the
method's hyperparameters under the key `algorithm` (configs/algorithms/*.yaml). Either file may carry a
`quick_test:` mapping of the same shape, laid over it when --quick_test is given. Overrides come last:
`--set section.key=value` for any key, or a stage's named flags (e.g. --batch_size). An override may only
change a key that exists, and keeps its type, so a typo is an error that names the key, never a silent no-op.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Iterable

import yaml

from utils.files import expands_beyond

MODEL_SECTIONS = ("model", "lora", "data", "training", "generation", "paths")
QUICK_TEST_KEY = "quick_test"


class ConfigError(ValueError):
    """A configuration problem, with a message that names the file or key at fault."""


# A configuration is a few hundred values; YAML aliases let a few hundred bytes stand for billions of them
# (written out in full in every manifest). Anything past this is refused when it is read.
MAX_YAML_VALUES = 100_000


def bounded(data: Any, where: str) -> Any:
    """data, or a ConfigError naming `where` when it expands beyond MAX_YAML_VALUES."""
    if expands_beyond(data, MAX_YAML_VALUES):
        raise ConfigError(f"{where}: expands to more than {MAX_YAML_VALUES} values (YAML aliases?); a configuration "
                          f"is refused past that")
    return data


def parse_yaml(text: str, where: str) -> Any:
    """YAML text (safe_load), bounded; a ConfigError naming `where` when it cannot be read."""
    try:
        return bounded(yaml.safe_load(text), where)
    except (yaml.YAMLError, RecursionError) as err:
        raise ConfigError(f"{where}: not valid YAML ({str(err).splitlines()[0] or 'nested too deeply'})") from None


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a readable YAML file ({str(err).splitlines()[0]})") from None
    data = parse_yaml(text, str(path))
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
    except (yaml.YAMLError, RecursionError):
        value = raw  # not YAML: the text as it is
    return key, bounded(value, f"--set {key}")


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


# ----------------------------------------------------------------------------------------------------------
# values: every key with a closed set of values or a range, checked on the resolved configuration (after the
# quick_test overlay and every override), wherever the key occurs

def one_of(*choices):
    def check(value):
        return None if value in choices else f"must be one of {', '.join(map(str, choices))}"
    return check


def number(low: float | None = None, high: float | None = None, *, integer: bool = False, low_open: bool = False,
           high_open: bool = False, null: bool = False, also: tuple = ()):
    """A number in [low, high] (open ends where asked); integer only; null allowed; `also`: extra values."""
    def check(value):
        if value is None and null or value in also and not isinstance(value, bool):
            return None
        kind = "an integer" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or \
                (isinstance(value, float) and not math.isfinite(value)):
            return f"must be {kind}{' or null' if null else ''}"
        if low is not None and (value <= low if low_open else value < low) or \
                high is not None and (value >= high if high_open else value > high):
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            extra = f" (or {', '.join(map(str, also))})" if also else ""
            return f"must be {kind} {' and '.join(part for part in (lo, hi) if part)}{extra}" + \
                (" or null (null = all)" if null else "")
        return None
    return check


def reward_weights(value):
    """algorithm.reward_weights: weights put in place of the run's reward spec's ({} = none)."""
    from utils.reward import RewardWeights  # utils.reward imports this module

    if not isinstance(value, dict):
        return "must be a mapping of reward weights, e.g. {partial_program: 0.6} ({} = the run's reward spec)"
    try:
        RewardWeights().replaced(value)
    except ValueError as err:
        return f"is not valid: {err}"
    return None


def path_inside(value):
    """A relative path inside a stage folder, or null."""
    if value is None or isinstance(value, str) and value.strip() and not Path(value).is_absolute():
        return None
    return "must be a relative path inside the run's stage folder, or null"


COUNT = number(1, integer=True)                       # at least one
OPTIONAL_COUNT = number(1, integer=True, null=True)   # null = all
POSITIVE = number(0, low_open=True)
SPLITS = ("train", "val", "test")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
RULES = {
    "model.dtype": one_of("auto", "float32", "bfloat16", "float16"),
    "model.torch_threads": number(0, integer=True),
    "lora.r": COUNT, "lora.alpha": POSITIVE, "lora.dropout": number(0, 1, high_open=True),
    "data.context_mode": one_of("gold", "full", "retrieved"),
    "data.max_prompt_tokens": COUNT, "data.retrieval_top_k": COUNT,
    "training.batch_size": COUNT, "training.gradient_accumulation_steps": COUNT,
    "training.learning_rate": POSITIVE, "training.max_seq_length": COUNT,
    "generation.batch_size": COUNT, "generation.max_new_tokens": COUNT, "generation.temperature": POSITIVE,
    "generation.top_p": number(0, 1, low_open=True), "generation.lookup_draft_tokens": number(0, integer=True),
    "generation.engine": one_of("native", "vllm"),
    "candidates.num_candidates": COUNT, "candidates.split": one_of(*SPLITS),
    "candidates.max_prompts": OPTIONAL_COUNT,
    "evaluation.split": one_of(*SPLITS, "official_test"), "evaluation.max_examples": OPTIONAL_COUNT,
    # algorithms (configs/algorithms/*.yaml; a key means the same in every method that has it)
    "algorithm.epochs": POSITIVE, "algorithm.max_steps": number(1, integer=True, also=(-1,)),
    "algorithm.max_train_examples": OPTIONAL_COUNT, "algorithm.warmup_ratio": number(0, 1, high_open=True),
    "algorithm.weight_decay": number(0), "algorithm.lr_scheduler_type": one_of(*SCHEDULERS),
    "algorithm.max_grad_norm": POSITIVE, "algorithm.logging_steps": COUNT,
    "algorithm.eval_every_steps": number(0, integer=True), "algorithm.n_val_examples": OPTIONAL_COUNT,
    "algorithm.save_every_steps": COUNT, "algorithm.save_total_limit": OPTIONAL_COUNT,
    "algorithm.learning_rate": POSITIVE, "algorithm.steps": COUNT, "algorithm.prompts_per_step": COUNT,
    "algorithm.num_generations": number(2, integer=True), "algorithm.micro_batch_size": OPTIONAL_COUNT,
    "algorithm.beta": number(0), "algorithm.epsilon": POSITIVE, "algorithm.num_iterations": COUNT,
    "algorithm.max_completion_length": OPTIONAL_COUNT, "algorithm.max_new_tokens": OPTIONAL_COUNT,
    "algorithm.temperature": number(0, low_open=True, null=True),
    "algorithm.top_p": number(0, 1, low_open=True, null=True),
    "algorithm.scale_rewards": one_of("group", "batch", "none"),
    "algorithm.train_prompts": one_of("all", "mixed"),
    "algorithm.sft_checkpoint": path_inside, "algorithm.reward_weights": reward_weights,
    "algorithm.reward_control": one_of("none", "shuffled"),
    "algorithm.dynamic_sampling": one_of(True, False), "algorithm.dynamic_sampling_max_extra_groups": COUNT,
    "algorithm.use_vllm": one_of(True, False), "algorithm.vllm_mode": one_of("colocate", "server"),
    "algorithm.vllm_gpu_memory_utilization": number(0, 1, low_open=True),
    "algorithm.rollout_batch_size": COUNT, "algorithm.mini_batch_size": COUNT,
    "algorithm.gradient_accumulation_steps": COUNT, "algorithm.ppo_epochs": COUNT,
    "algorithm.clip_range": POSITIVE, "algorithm.cliprange_value": POSITIVE, "algorithm.vf_coef": number(0),
    "algorithm.gamma": number(0, 1, low_open=True), "algorithm.lam": number(0, 1, low_open=True),
    "algorithm.kl_coef": number(0),
    "algorithm.kl_target": POSITIVE, "algorithm.kl_horizon": COUNT,
    "algorithm.value_head_dropout": number(0, 1, high_open=True),
    "algorithm.max_length": OPTIONAL_COUNT, "algorithm.max_train_pairs": OPTIONAL_COUNT,
    "algorithm.eval_pairs_every_steps": number(0, integer=True),
    "algorithm.preference_eval_max_pairs": OPTIONAL_COUNT, "algorithm.preference_eval_batch_size": COUNT,
}


def validate_values(config: dict, rules: dict = RULES) -> None:
    """Every key of `rules` that the configuration has must satisfy its rule."""
    for key, check in rules.items():
        try:
            value = get_key(config, key)
        except ConfigError:
            continue
        problem = check(value)
        if problem:
            raise ConfigError(f"config key '{key}' {problem}, got {value!r}")


def load_algorithm(algo_config: str | Path, defaults: str | Path | None = None) -> dict:
    """A method's hyperparameters. With `defaults` (the stage's own YAML), a file given in its place needs only
    the keys it changes: every other key, and every quick_test key it does not set, comes from the defaults, so a
    default lives in one place. A key the defaults do not have is an error naming the file."""
    data = load_yaml(algo_config)
    if defaults is None or Path(defaults).resolve() == Path(algo_config).resolve():
        return data
    base = load_yaml(defaults)
    unknown = [key for key in data if key not in base] + \
        [f"{QUICK_TEST_KEY}.{key}" for key in (data.get(QUICK_TEST_KEY) or {}) if key not in base]
    if unknown:
        raise ConfigError(f"{algo_config}: unknown key(s) {', '.join(unknown)} (the keys are those of {defaults})")
    quick = {**(base.get(QUICK_TEST_KEY) or {}), **(data.get(QUICK_TEST_KEY) or {})}
    return {**base, **data, QUICK_TEST_KEY: quick}


def load_config(model_config: str | Path, algo_config: str | Path | None = None, quick_test: bool = False,
                overrides: Iterable[str] = (), named: dict[str, Any] | None = None,
                algo_defaults: str | Path | None = None) -> dict:
    """The fully resolved configuration of a stage (what its manifest records). algo_defaults: the stage's own
    algorithm YAML, which fills the keys a different --algo_config leaves out."""
    config = _with_quick_test(load_yaml(model_config), quick_test)
    validate_model_config(config, model_config)
    config["model_config_file"] = str(model_config)
    if algo_config is not None:
        config["algorithm"] = _with_quick_test(load_algorithm(algo_config, algo_defaults), quick_test, "algorithm.")
        config["algo_config_file"] = str(algo_config)
    try:
        config = apply_overrides(config, overrides, named)
        validate_values(config)
    except ConfigError as err:
        raise ConfigError(f"{err} (files: {model_config}{', ' + str(algo_config) if algo_config else ''})") from None
    return config


# ----------------------------------------------------------------------------------------------------------
# comparing resolved configurations (the driver's skip rule, 11's run diffs)

def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj} if prefix else {"": obj}


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def config_diff(old: Any, new: Any, added_defaults_differ: bool = True) -> list[str]:
    """'key: old -> new' for every flattened (dotted) key whose value differs. added_defaults_differ=False: a key
    that `old` lacks and `new` holds as null or {} is no difference (a key added to the YAMLs since, whose
    default keeps what the old configuration did; the driver's skip rule)."""
    a, b = flatten(_normalise(old or {})), flatten(_normalise(new or {}))
    lines = []
    for key in sorted(set(a) | set(b)):
        if key not in a and not added_defaults_differ and b[key] in (None, {}):
            continue
        if key not in a:
            lines.append(f"{key}: (absent) -> {b[key]!r}")
        elif key not in b:
            lines.append(f"{key}: {a[key]!r} -> (absent)")
        elif a[key] != b[key]:
            lines.append(f"{key}: {a[key]!r} -> {b[key]!r}")
    return lines
