"""The one reward calculator: every RL stage, candidate scoring and evaluation score completions with it.

A completion is the model's JSON answer, e.g. {"program": "subtract(5829, 5735), divide(#0, 5735)",
"answer": "1.6%"}. The program is executed (utils.finqa_program, FinQA's official rules) and its result is
what gets scored; the "answer" text is kept for reading but not scored.

Components of a RewardResult:
- format_ok: the completion holds a JSON object with a string "program" and a string/number "answer";
- program_valid: the program parses and executes (FinQA's official script sees no error);
- exec_match: FinQA's execution accuracy, round(result, 5) == exe_ans exactly (yes/no as strings);
- numeric_match: exec_match, or both numbers and |result - exe_ans| <= numeric_tolerance * |exe_ans|
  (|result| <= ZERO_TOLERANCE when exe_ans is 0). A yes/no answer matches only exactly;
- program_match: FinQA's program accuracy (symbolically equivalent to the gold program, and the official
  script's result equals exe_ans; see utils.finqa_program: it can hold without exec_match);
- program_check_bounded: program_match is False because the equivalence check met one of utils.finqa_program's
  bounds (size, power, time), not by FinQA's rule;
- partial_program: steps (op, arg1, arg2; #refs compared literally) shared by the gold and predicted programs,
  each predicted step used once (multiset), over the longer program's step count (padding earns nothing);
- scale_error: a wrong number that is exe_ans * 100 or exe_ans / 100 within the tolerance (35 vs 0.35);
- failure_reason: "correct", "invalid_json", "invalid_program", "scale_error" or "wrong_value".

The total (exactly one rule applies, the first that holds):
    format not ok     -> weights.format_violation                      (-0.2)
    exec_match        -> weights.exact                                 (+1.0)
    numeric_match     -> weights.numeric                               (+0.8)
    otherwise         -> weights.partial_program * partial_program     (0 .. +0.3)
so it always lies within RewardWeights.bounds(). The rule that paid is RewardResult.rewarded, and
RewardResult.contributions() splits the total into per-component parts (one is the total, the others 0),
which is what the trl reward functions from make_reward_functions return, one function per part.
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from utils.config import ConfigError, parse_yaml
from utils.finqa_program import equivalence, execute_program, execution_match, program_steps, results_match

ZERO_TOLERANCE = 1e-6  # absolute tolerance for numeric_match when exe_ans is 0 (relative makes no sense there)
COMPONENTS = ("exact", "numeric", "partial_program", "format")
FAILURE_REASONS = ("correct", "invalid_json", "invalid_program", "scale_error", "wrong_value")
TOTAL_RULE = ("format not ok -> format_violation; else exec_match -> exact; else numeric_match -> numeric; "
              "else partial_program * shared steps / steps of the longer program")


# ----------------------------------------------------------------------------------------------------------
# weights (reward_spec.yaml)

@dataclass
class RewardWeights:
    exact: float = 1.0
    numeric: float = 0.8
    partial_program: float = 0.3
    format_violation: float = -0.2
    numeric_tolerance: float = 0.05  # relative

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"reward weight {field.name!r} must be a finite number, got {value!r}")
            setattr(self, field.name, float(value))
        if self.numeric_tolerance < 0:
            raise ValueError(f"reward weight 'numeric_tolerance' must be >= 0, got {self.numeric_tolerance}")

    @classmethod
    def from_spec(cls, spec: str | Path | dict) -> RewardWeights:
        """Weights from reward_spec.yaml (a path) or its parsed dict:
        {weights: {exact, numeric, partial_program, format_violation}, numeric_tolerance}. Missing keys keep
        their defaults; unknown keys are errors (a typo would silently keep a default)."""
        if isinstance(spec, (str, Path)):
            path = Path(spec)
            if not path.is_file():
                raise ConfigError(f"reward spec not found: {path}")
            try:
                return cls.from_spec(parse_yaml(path.read_bytes().decode("utf-8"), str(path)))
            except UnicodeDecodeError as err:
                raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
            except ConfigError:
                raise
            except ValueError as err:
                raise ConfigError(f"{path}: {err}") from None
        if not isinstance(spec, dict):
            raise ValueError(f"reward spec must be a mapping, got {type(spec).__name__}")
        for key in spec:
            if key not in ("weights", "numeric_tolerance", "description"):
                raise ValueError(f"unknown reward spec key {key!r} (expected weights, numeric_tolerance)")
        weights = spec.get("weights") or {}
        if not isinstance(weights, dict):
            raise ValueError(f"reward spec key 'weights' must be a mapping, got {type(weights).__name__}")
        cls._check_names(weights, [field.name for field in fields(cls) if field.name != "numeric_tolerance"])
        values = dict(weights)
        if "numeric_tolerance" in spec:
            values["numeric_tolerance"] = spec["numeric_tolerance"]
        return cls(**values)

    def replaced(self, values: dict) -> RewardWeights:
        """These weights with some put in place (an RL method's algorithm.reward_weights); names as in to_spec's
        weights, plus numeric_tolerance."""
        self._check_names(values, [field.name for field in fields(self)])
        return replace(self, **values)

    @staticmethod
    def _check_names(keys, names: list[str]) -> None:
        """Unknown names are errors: a typo would silently keep a default."""
        for key in keys:
            if key not in names:
                raise ValueError(f"unknown reward weight {key!r} (expected one of {', '.join(names)})")

    def to_spec(self) -> dict:
        """The reward_spec.yaml content (from_spec reads it back)."""
        return {
            "weights": {"exact": self.exact, "numeric": self.numeric, "partial_program": self.partial_program,
                        "format_violation": self.format_violation},
            "numeric_tolerance": self.numeric_tolerance,
            "description": TOTAL_RULE,
        }

    def bounds(self) -> tuple[float, float]:
        """The lowest and highest total any completion can get."""
        values = (self.format_violation, self.exact, self.numeric, self.partial_program, 0.0)
        return min(values), max(values)


# ----------------------------------------------------------------------------------------------------------
# parsing the completion

@dataclass
class ParsedCompletion:
    ok: bool
    program: str | None = None
    answer: str | None = None
    error: str | None = None


def parse_completion(text) -> ParsedCompletion:
    """The first JSON object in the text (after any ```json fence, before any trailing text), which must have
    a string "program" and an "answer" (string or number, returned as a string). Never raises."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    if not isinstance(text, str):
        return ParsedCompletion(ok=False, error=f"completion is {type(text).__name__}, not text")
    start = text.find("{")
    if start < 0:
        return ParsedCompletion(ok=False, error="no JSON object in the completion")
    try:
        obj, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as err:
        return ParsedCompletion(ok=False, error=f"invalid JSON: {err.msg} at char {err.pos}")
    except (ValueError, RecursionError):  # huge integers, absurd nesting
        return ParsedCompletion(ok=False, error="invalid JSON")
    program, answer = obj.get("program"), obj.get("answer")
    if not isinstance(program, str):
        return ParsedCompletion(ok=False, error='"program" is missing or not a string')
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        return ParsedCompletion(ok=False, program=program, error='"answer" is missing or not a string/number')
    return ParsedCompletion(ok=True, program=program, answer=str(answer))


# ----------------------------------------------------------------------------------------------------------
# coercing dataset columns

def coerce_exe_ans(value) -> float | str | None:
    """exe_ans as FinQA holds it: a float, or "yes"/"no". Dataset columns store it as text ("0.34719")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            return text
    return None


def coerce_table(value) -> list:
    """The table as a list of rows; dataset columns may hold it as a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return []
    return list(value) if isinstance(value, (list, tuple)) else []


def _is_number(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def numbers_close(value, target, tolerance: float) -> bool:
    """|value - target| <= tolerance * |target|, or |value| <= ZERO_TOLERANCE for a target of 0."""
    if not (_is_number(value) and _is_number(target)):
        return False
    if target == 0:
        return abs(value) <= ZERO_TOLERANCE
    return abs(value - target) <= tolerance * abs(target)


def partial_program_score(pred_program, gold_program) -> float:
    """Matched steps over the longer of the two programs (multiset: each predicted step counts once).

    Dividing by the longer program, not just the gold one, keeps a policy from collecting partial credit by
    padding its program with guessed steps."""
    gold = program_steps(gold_program)
    if not gold:
        return 0.0
    predicted = program_steps(pred_program)
    available = Counter(predicted)
    hits = 0
    for step in gold:
        if available[step] > 0:
            available[step] -= 1
            hits += 1
    return hits / max(len(gold), len(predicted))


# ----------------------------------------------------------------------------------------------------------
# scoring

@dataclass
class RewardResult:
    format_ok: bool = False
    program_valid: bool = False
    exec_match: bool = False
    numeric_match: bool = False
    program_match: bool = False
    program_check_bounded: bool = False
    partial_program: float = 0.0
    scale_error: bool = False
    failure_reason: str = "invalid_json"
    executed_value: float | str | None = None
    program: str | None = None
    answer: str | None = None
    error: str | None = None
    rewarded: str = "format"  # the component (COMPONENTS) whose rule set the total
    total: float = 0.0

    def contributions(self) -> dict[str, float]:
        """The total split by component: the rewarded one carries it all, so the parts sum to it exactly."""
        return {name: (self.total if name == self.rewarded else 0.0) for name in COMPONENTS}

    def to_dict(self) -> dict:
        return asdict(self)


class RewardCalculator:
    def __init__(self, weights: RewardWeights | None = None, shuffle_seed: int | None = None):
        self.weights = weights or RewardWeights()
        # the random-reward control (algorithm.reward_control: shuffled): see for_training
        self.shuffle_seed = shuffle_seed
        self._step, self._calls = None, 0

    @property
    def shuffled(self) -> bool:
        return self.shuffle_seed is not None

    def for_training(self, results: list[RewardResult], step: int | None = None) -> list[RewardResult]:
        """The rewards a training batch (a step's rollouts) learns from: the results as scored, or, under the
        random-reward control, a random permutation of them. The batch keeps exactly its rewards' values (so the
        distribution's shape, mean and spread, step by step, as the real reward's), but no reward follows the
        completion that earned it: what the method gains from it is what a reward without information gives. The
        permutation is seeded by (seed, step, the batch's place in the step), so a resumed run redoing a step
        permutes as the interrupted one did. Validation and evaluation score items one by one (score /
        score_example) and are never shuffled."""
        if self.shuffle_seed is None:
            return results
        if step != self._step:
            self._step, self._calls = step, 0
        self._calls += 1
        return random.Random(f"{self.shuffle_seed}:{step}:{self._calls}").sample(results, len(results))

    def score(self, completion: str, gold_program: str, exe_ans, table) -> RewardResult:
        """Score one completion against the gold program, exe_ans (float or "yes"/"no", or their text) and
        the table (rows, or their JSON). Never raises on any completion."""
        w = self.weights
        parsed = parse_completion(completion)
        if not parsed.ok:
            return RewardResult(program=parsed.program, error=parsed.error, rewarded="format",
                                total=w.format_violation)

        exe_ans = coerce_exe_ans(exe_ans)
        table = coerce_table(table)
        result = RewardResult(format_ok=True, program=parsed.program, answer=parsed.answer)
        execution = execute_program(parsed.program, table)
        result.program_valid = execution.valid
        result.executed_value = execution.value
        result.error = execution.error
        result.partial_program = partial_program_score(parsed.program, gold_program)
        result.exec_match = execution_match(execution, exe_ans)
        # FinQA's program accuracy compares what its script holds after running the program, which can be
        # exe_ans although a later step failed; sympy only where that holds
        check = equivalence(parsed.program, gold_program) if results_match(execution.official_value, exe_ans) \
            else None
        result.program_match = check is not None and check.equivalent
        result.program_check_bounded = check is not None and check.bounded
        if execution.valid:
            value = execution.value
            result.numeric_match = result.exec_match or numbers_close(value, exe_ans, w.numeric_tolerance)
            result.scale_error = not result.numeric_match and _is_number(exe_ans) and exe_ans != 0 and (
                numbers_close(value, exe_ans * 100, w.numeric_tolerance)
                or numbers_close(value, exe_ans / 100, w.numeric_tolerance))

        if not execution.valid:
            result.failure_reason = "invalid_program"
        elif result.exec_match:
            result.failure_reason = "correct"
        elif result.scale_error:
            result.failure_reason = "scale_error"
        else:
            result.failure_reason = "wrong_value"

        if result.exec_match:
            result.rewarded, result.total = "exact", w.exact
        elif result.numeric_match:
            result.rewarded, result.total = "numeric", w.numeric
        else:
            result.rewarded, result.total = "partial_program", w.partial_program * result.partial_program
        return result

    def score_example(self, completion: str, example: dict) -> RewardResult:
        """Score against a processed row (keys target_program, exe_ans, table)."""
        missing = [key for key in ("target_program", "exe_ans", "table") if key not in example]
        if missing:
            raise KeyError(f"example lacks {', '.join(missing)} (is it a processed FinQA row?)")
        return self.score(completion, example["target_program"], example["exe_ans"], example["table"])


# ----------------------------------------------------------------------------------------------------------
# trl reward functions

def completion_text(completion) -> str:
    """A trl completion as text: a string, or chat messages (the last assistant message's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)):
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role") == "assistant"] or messages
        if not assistant:
            return ""
        content = assistant[-1].get("content")
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
            return "".join(part.get("text", "") for part in content
                           if isinstance(part, dict) and isinstance(part.get("text"), str))
        return content if isinstance(content, str) else ""
    return ""


class _BatchScorer:
    """Scores a trl batch once, although trl calls each component's function on the same batch in turn."""

    def __init__(self, calculator: RewardCalculator):
        self.calculator = calculator
        self._key = None
        self._results: list[RewardResult] = []

    def __call__(self, completions, kwargs: dict) -> list[RewardResult]:
        missing = [key for key in ("target_program", "exe_ans", "table") if key not in kwargs]
        if missing:
            raise ValueError(f"reward functions need the dataset columns {', '.join(missing)}")
        texts = [completion_text(c) for c in completions]
        columns = (kwargs["target_program"], kwargs["exe_ans"], kwargs["table"])
        key = repr((texts, columns))
        if key != self._key:
            state = kwargs.get("trainer_state")  # trl passes it: the step the batch trains
            self._results = self.calculator.for_training([self.calculator.score(text, gold, exe_ans, table)
                                                          for text, gold, exe_ans, table in zip(texts, *columns,
                                                                                                strict=True)],
                                                         state.global_step if state is not None else None)
            self._key = key
        return self._results


def make_reward_functions(calculator: RewardCalculator | None = None) -> list:
    """One trl reward function per component (reward_exact, reward_numeric, reward_partial_program,
    reward_format); with trl's reward_weights all 1.0 they add up to the calculator's total exactly."""
    scorer = _BatchScorer(calculator or RewardCalculator())

    def component_function(component: str):
        def reward(completions, **kwargs) -> list[float]:
            return [result.contributions()[component] for result in scorer(completions, kwargs)]

        reward.__name__ = reward.__qualname__ = f"reward_{component}"
        return reward

    return [component_function(component) for component in COMPONENTS]


def make_total_reward_function(calculator: RewardCalculator | None = None):
    """A single trl reward function returning the total."""
    scorer = _BatchScorer(calculator or RewardCalculator())

    def reward_total(completions, **kwargs) -> list[float]:
        return [result.total for result in scorer(completions, kwargs)]

    return reward_total
