"""FinQA's program DSL: tokenizing, executing and comparing programs by the rules of FinQA's official
evaluation script (czyssrs/FinQA, code/evaluate/evaluate.py), reimplemented without eval, so that it never
raises and does bounded work on whatever a model writes.

A program is a list of steps `op(arg1, arg2)` joined by ", ", e.g. "subtract(5829, 5735), divide(#0, 5735)".
`#k` is the result of step k (steps count from 0, also in our error messages). Arguments are numbers
("5,829", "1.6%", "const_100") or, for the table ops, a row name (the exact first cell of a table row) and
"none".

The official script works on a token list ("subtract(", "5829", "5735", ")", ..., "EOF"): it checks that
every 4th token is an op and every 4th+3 token is ")", joins the tokens with "|", splits on ")" and parses each
piece. We follow that same pipeline, so its quirks are ours too:
- an unclosed last step (the "divide(#0" of "add(1, 2), divide(#0") is ignored: only closed steps run;
- table ops ignore their second argument, and a table op whose row is a #ref reuses the row of the previous
  table step (the official code leaves its variable in place);
- greater returns "yes"/"no" (two yes/no results compare as strings); results are rounded with
  round(x, 5) only at the end;
- str_to_num accepts whatever float() accepts (" 1_000", "nan", "1e999") and any "const_<number>".

Deviations, all on inputs where the official script crashes, hangs or returns a value that can never equal
a FinQA answer:
- a result that is nan, inf or complex (e.g. exp(-8, 0.5)) is invalid (official: valid, never equal to a
  gold answer); a yes/no result used in arithmetic is invalid (official: str concatenation for add);
- more than MAX_STEPS steps is invalid / not equivalent;
- equivalence gives up (False) when an expression tree would have more than MAX_EXPR_NODES nodes (sympy's
  simplify can take minutes on big ones, and shared #refs can make the official string expression
  exponentially long), and returns False instead of raising on a malformed gold program;
- a token list is read as the official format; a trailing "EOF" is dropped (the official script drops the
  last token whatever it is).
Before calling sympy, equivalence evaluates both programs at three random points and answers False when
they differ at every point where both are defined: simplify keeps values, so such programs can never
simplify to the same expression. It only saves time (fuzzed against the official script: same answers).
"""
from __future__ import annotations

import cmath
import functools
import math
import random
from dataclasses import dataclass

OPS = ("add", "subtract", "multiply", "divide", "exp", "greater",
       "table_max", "table_min", "table_sum", "table_average")
BINARY_OPS = OPS[:6]
TABLE_OPS = OPS[6:]

# FinQA's constant list (code/generator/constant_list.txt). str_to_num, like the official script, also
# accepts any other "const_<number>" (const_5 occurs in the data).
CONSTANTS = {
    "const_1": 1.0, "const_2": 2.0, "const_3": 3.0, "const_4": 4.0, "const_6": 6.0, "const_7": 7.0,
    "const_8": 8.0, "const_9": 9.0, "const_10": 10.0, "const_100": 100.0, "const_1000": 1000.0,
    "const_10000": 10000.0, "const_100000": 100000.0, "const_1000000": 1000000.0,
    "const_10000000": 10000000.0, "const_1000000000": 1000000000.0, "const_m1": -1.0,
}

MAX_STEPS = 64          # FinQA's gold programs have at most a handful of steps
MAX_EXPR_NODES = 48     # bound on the expression tree handed to sympy (FinQA's gold trees are ~10 nodes);
                        # simplify takes seconds on some 60-node trees and minutes on some 400-node ones


@dataclass
class ExecutionResult:
    valid: bool
    value: float | str | None  # round(x, 5) like the official script, or "yes"/"no"; None when invalid
    error: str | None          # why it is invalid, for people reading failures


# ----------------------------------------------------------------------------------------------------------
# tokens and steps

def tokenize_program(program: str) -> list[str]:
    """FinQA's program_tokenization: "add(1, 2)" -> ["add(", "1", "2", ")", "EOF"]. Never raises."""
    if not isinstance(program, str):
        return ["EOF"]
    tokens = []
    for piece in program.split(", "):
        current = ""
        for char in piece:
            if char == ")" and current:
                tokens.append(current)
                current = ""
            current += char
            if char in "()":
                tokens.append(current)
                current = ""
        if current:
            tokens.append(current)
    tokens.append("EOF")
    return tokens


def to_official_tokens(program: str) -> list[str]:
    """The leaderboard's "predicted" field: the program's tokens ending in "EOF"."""
    return tokenize_program(program)


def _as_tokens(program) -> list[str] | None:
    """Program string or official token list -> tokens without the final EOF; None if neither."""
    if isinstance(program, str):
        return tokenize_program(program)[:-1]
    if isinstance(program, (list, tuple)):
        tokens = list(program)
        return tokens[:-1] if tokens and tokens[-1] == "EOF" else tokens
    return None


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _structure_error(tokens: list) -> str | None:
    """The official structure check: every 4th token is an op, every 4th+3 token is ")"."""
    for index, token in enumerate(tokens):
        if not isinstance(token, str):
            return f"token {index} is not a string"
        if index % 4 == 0 and token.strip("(") not in OPS:
            return f"unknown op {_short(token.strip('('))}"
        if index % 4 == 3 and token != ")":
            return f"step {index // 4} does not close after two arguments (got {_short(token)})"
    return None


def _raw_steps(tokens: list[str]) -> list[str]:
    """The official split into step strings: join with "|", cut at ")", drop the unclosed rest."""
    return [step.strip() for step in "|".join(tokens).split(")")[:-1]]


def _parse_step(step: str) -> tuple[str, str, str] | None:
    """"|divide(|#0|5735|" -> ("divide", "#0", "5735"); None where the official parse fails."""
    parts = step.split("(")
    if len(parts) != 2:
        return None
    op = parts[0].strip("|").strip()
    args = parts[1].strip("|").strip().split("|")
    if len(args) < 2:
        return None
    return op, args[0].strip(), args[1].strip()


def program_steps(program) -> list[tuple[str, str, str]]:
    """Best-effort (op, arg1, arg2) list, skipping pieces that do not parse; [] for garbage. Never raises."""
    tokens = _as_tokens(program)
    if tokens is None or not all(isinstance(token, str) for token in tokens):
        return []
    steps = []
    for step in _raw_steps(tokens):
        parsed = _parse_step(step)
        if parsed is not None and parsed[0]:
            steps.append(parsed)
    return steps


# ----------------------------------------------------------------------------------------------------------
# numbers

def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:  # also digit strings past Python's int conversion limit
        return None


def str_to_num(text) -> float | None:
    """The official str_to_num: drop commas; "x%" -> x/100; "const_x" -> x (const_m1 -> -1); else None."""
    if not isinstance(text, str):
        return None
    text = text.replace(",", "")
    number = _float_or_none(text)
    if number is not None:
        return number
    if "%" in text:
        number = _float_or_none(text.replace("%", ""))
        return None if number is None else number / 100.0
    if "const" in text:
        text = text.replace("const_", "")
        return -1.0 if text == "m1" else _float_or_none(text)
    return None


def table_row_to_numbers(cells) -> list[float] | None:
    """The official process_row: per cell drop "$", cut at "(", then str_to_num; None if any cell fails."""
    numbers = []
    for cell in cells:
        if not isinstance(cell, str):
            return None
        number = str_to_num(cell.replace("$", "").strip().split("(")[0].strip())
        if number is None:
            return None
        numbers.append(number)
    return numbers


def results_match(value, exe_ans) -> bool:
    """The official execution match: round(value, 5) == exe_ans exactly; yes/no compare as strings."""
    if isinstance(value, bool) or isinstance(exe_ans, bool):
        return False
    if isinstance(value, str) or isinstance(exe_ans, str):
        return isinstance(value, str) and isinstance(exe_ans, str) and value == exe_ans
    if not isinstance(value, (int, float)) or not isinstance(exe_ans, (int, float)):
        return False
    if not math.isfinite(value):
        return False
    return round(value, 5) == exe_ans


# ----------------------------------------------------------------------------------------------------------
# execution

def _invalid(error: str) -> ExecutionResult:
    return ExecutionResult(valid=False, value=None, error=error)


def _step_ref(arg: str, results: list, index: int) -> tuple[object, str | None]:
    """The value of "#k" the way the official script reads it: int(arg without "#")."""
    k = _int_or_none(arg.replace("#", ""))
    if k is None:
        return None, f"step {index} has a bad step reference {_short(arg)}"
    if not 0 <= k < len(results):
        return None, f"step {index} refers to #{k}, which is not computed yet"
    return results[k], None


def _operand(arg: str, results: list, index: int) -> tuple[object, str | None]:
    if "#" in arg:
        return _step_ref(arg, results, index)
    number = str_to_num(arg)
    if number is None:
        return None, f"step {index}: {_short(arg)} is not a number"
    return number, None


def _binary(op: str, a, b, index: int) -> tuple[object, str | None]:
    """One arithmetic step on floats (or complex / yes-no intermediates), with Python's float semantics."""
    if op == "greater":
        # the official script compares whatever it holds: numbers, or two yes/no strings
        if isinstance(a, complex) or isinstance(b, complex) or isinstance(a, str) != isinstance(b, str):
            return None, f"step {index}: greater compares values that cannot be compared"
        return ("yes" if a > b else "no"), None
    if isinstance(a, str) or isinstance(b, str):
        return None, f"step {index}: {op} on a yes/no result"
    try:
        if op == "add":
            return a + b, None
        if op == "subtract":
            return a - b, None
        if op == "multiply":
            return a * b, None
        if op == "divide":
            return a / b, None
        return a ** b, None  # exp; float ** float is O(1): it overflows (raises) rather than hangs
    except ZeroDivisionError:
        what = "division by zero" if op == "divide" else "zero to a negative power"
        return None, f"step {index}: {what}"
    except OverflowError:
        return None, f"step {index}: overflow in {op}"


def _table_rows(table) -> tuple[dict | None, str | None]:
    """Row name -> cells, later rows winning like the official dict."""
    if not isinstance(table, (list, tuple)):
        return None, "no table"
    rows = {}
    for row in table:
        if not isinstance(row, (list, tuple)) or not row:
            return None, "malformed table row"
        try:
            rows[row[0]] = row[1:]
        except TypeError:
            return None, "malformed table row"
    return rows, None


def _table_value(op: str, numbers: list[float], index: int) -> tuple[object, str | None]:
    if op == "table_sum":
        return float(sum(numbers)), None
    if not numbers:
        return None, f"step {index}: {op} of a row without numbers"
    if op == "table_max":
        return max(numbers), None
    if op == "table_min":
        return min(numbers), None
    return sum(numbers) / len(numbers), None


def _problem(value, op: str, index: int) -> str | None:
    """Why an intermediate value cannot be a FinQA answer (remembered in case it reaches the end)."""
    if isinstance(value, complex):
        return f"step {index}: {op} gives a complex number"
    if isinstance(value, float) and math.isnan(value):
        return f"step {index}: {op} gives nan"
    if isinstance(value, float) and math.isinf(value):
        return f"step {index}: overflow in {op} (inf)"
    return None


def execute_program(program: str | list[str], table: list[list[str]]) -> ExecutionResult:
    """Run a program (string, or official token list ending in "EOF") on a table. Never raises."""
    tokens = _as_tokens(program)
    if tokens is None:
        return _invalid("program is neither a string nor a token list")
    error = _structure_error(tokens)
    if error:
        return _invalid(error)
    steps = _raw_steps(tokens)
    if not steps:
        return _invalid("empty program")
    if len(steps) > MAX_STEPS:
        return _invalid(f"too many steps ({len(steps)} > {MAX_STEPS})")

    results: list = []
    problems: list[str | None] = []
    last_row = None
    for index, step in enumerate(steps):
        parsed = _parse_step(step)
        if parsed is None:
            return _invalid(f"step {index} is malformed (expected op(arg1, arg2))")
        op, arg1, arg2 = parsed
        if op in BINARY_OPS:
            a, error = _operand(arg1, results, index)
            if error:
                return _invalid(error)
            b, error = _operand(arg2, results, index)
            if error:
                return _invalid(error)
            value, error = _binary(op, a, b, index)
        elif op in TABLE_OPS:
            rows, error = _table_rows(table)
            if error:
                return _invalid(error)
            if "#" in arg1:
                # official quirk: a #ref row keeps the row of the previous table step
                _, error = _step_ref(arg1, results, index)
                if error:
                    return _invalid(error)
                if last_row is None:
                    return _invalid(f"step {index}: {op} needs a row name, not {_short(arg1)}")
            else:
                if arg1 not in rows:
                    return _invalid(f"row {_short(arg1)} not in table")
                last_row = table_row_to_numbers(rows[arg1])
                if last_row is None:
                    return _invalid(f"row {_short(arg1)} has a cell that is not a number")
            value, error = _table_value(op, last_row, index)
        else:
            return _invalid(f"unknown op {_short(op)}")
        if error:
            return _invalid(error)
        results.append(value)
        problems.append(_problem(value, op, index))

    if problems[-1]:
        # nan/inf/complex: name the first step where it appeared, the likely cause
        return _invalid(next(problem for problem in problems if problem))
    value = results[-1]
    if isinstance(value, str):
        return ExecutionResult(valid=True, value=value, error=None)
    return ExecutionResult(valid=True, value=round(value, 5), error=None)


# ----------------------------------------------------------------------------------------------------------
# symbolic equivalence (official equal_program) and program accuracy

def _steps_size(parsed: list[tuple[str, str, str]], limit: int) -> int | None:
    """Node count of the expression tree of the last step (refs expanded), or None past the limit."""
    sizes: list[int] = []
    for op, arg1, arg2 in parsed:
        size = 1
        if "table" not in op:
            for arg in (arg1, arg2):
                if "#" in arg:
                    k = _int_or_none(arg.replace("#", ""))
                    if k is None or not 0 <= k < len(sizes):
                        return None
                    size += sizes[k]
                else:
                    size += 1
        if size > limit:
            return None
        sizes.append(size)
    return sizes[-1] if sizes else None


def _expression(steps: list[str], parsed: list[tuple[str, str, str]], sym_map: dict):
    """The sympy expression of the last step, built with sympy's operators exactly as the official script's
    string "( a0 + a1 )" would be parsed (sympify evaluates), but without parsing any text."""
    import sympy

    built: list = []
    for step, (op, arg1, arg2) in zip(steps, parsed):
        if "table" in op:
            built.append(sympy.Symbol(sym_map[step]))
            continue
        operands = []
        for arg in (arg1, arg2):
            if "#" in arg:
                operands.append(built[int(arg.replace("#", ""))])  # backwards, checked by _steps_size
            else:
                operands.append(sympy.Symbol(sym_map[arg]))
        a, b = operands
        if op == "add":
            built.append(a + b)
        elif op == "subtract":
            built.append(a - b)
        elif op == "multiply":
            built.append(a * b)
        elif op == "divide":
            built.append(a / b)
        elif op == "exp":
            built.append(a ** b)
        elif op == "greater":
            built.append(a > b)  # StrictGreaterThan; raises TypeError on relational operands, like sympify
        else:
            raise ValueError(f"unknown op {op}")
    return built[-1]


@functools.lru_cache(maxsize=4096)
def _gold_form(gold_tokens: tuple) -> tuple[list[str], list, dict] | None:
    """Gold step strings, parsed steps and the official symbol map (first appearance -> "a0", "a1", ...):
    one symbol per distinct number argument and per distinct table step string."""
    steps = _raw_steps(list(gold_tokens))
    parsed = [_parse_step(step) for step in steps]
    if not steps or any(p is None for p in parsed):
        return None
    sym_map: dict[str, str] = {}
    for step, (op, arg1, arg2) in zip(steps, parsed):
        names = [step] if "table" in op else [arg for arg in (arg1, arg2) if "#" not in arg]
        for name in names:
            if name not in sym_map:
                sym_map[name] = f"a{len(sym_map)}"
    return steps, parsed, sym_map


@functools.lru_cache(maxsize=4096)
def _gold_simplified(gold_tokens: tuple):
    import sympy

    steps, parsed, sym_map = _gold_form(gold_tokens)
    if _steps_size(parsed, MAX_EXPR_NODES) is None:
        return None
    return sympy.simplify(_expression(steps, parsed, sym_map))


def _pred_fits(steps: list[str], parsed: list, sym_map: dict) -> bool:
    """The official checks on the prediction: table steps and number args must occur in the gold program,
    #refs must point backwards."""
    for index, (step, (op, arg1, arg2)) in enumerate(zip(steps, parsed)):
        if "table" in op:
            if step not in sym_map:
                return False
            continue
        for arg in (arg1, arg2):
            if "#" not in arg:
                if arg not in sym_map:
                    return False
            else:
                k = _int_or_none(arg.strip("#"))
                if k is None or k >= index:
                    return False
    return True


# Points at which both programs are evaluated before calling sympy: symbol "a<i>" gets _POINTS[k][i].
_POINTS = [[random.Random(1000 * k + i).uniform(1.5, 4.5) for i in range(256)] for k in range(3)]


def _numeric_value(steps: list[str], parsed: list, sym_map: dict, point: list[float]):
    """The last step's value at a point, in complex arithmetic (sympy's symbols are complex, and its powers
    take the principal branch like Python's); for a final greater, the pair (lhs, rhs). None if undefined."""
    def symbol(name: str) -> complex:
        return complex(point[int(sym_map[name][1:]) % len(point)])

    values: list = []
    for step, (op, arg1, arg2) in zip(steps, parsed):
        if "table" in op:
            values.append(symbol(step))
            continue
        a, b = [values[int(arg.replace("#", ""))] if "#" in arg else symbol(arg) for arg in (arg1, arg2)]
        values.append(_complex_step(op, a, b))
    return values[-1]


def _complex_step(op: str, a, b):
    if not (isinstance(a, complex) and isinstance(b, complex)):
        return None  # undefined operand, or a greater pair used in arithmetic
    if op == "greater":
        return a, b
    try:
        if op == "add":
            value = a + b
        elif op == "subtract":
            value = a - b
        elif op == "multiply":
            value = a * b
        elif op == "divide":
            value = a / b
        elif op == "exp":
            value = a ** b
        else:
            return None
    except (ZeroDivisionError, OverflowError):
        return None
    return value if cmath.isfinite(value) else None


def _differs(gold, pred) -> bool | None:
    """True/False where the two values settle it, None where they cannot (undefined, or too close)."""
    if gold is None or pred is None or isinstance(gold, tuple) != isinstance(pred, tuple):
        return None
    if not isinstance(gold, tuple):
        return abs(gold - pred) > 1e-6 * max(1.0, abs(gold), abs(pred))
    # greater: simplify may rewrite the inequality, but not change its truth at a real point
    truths = []
    for lhs, rhs in (gold, pred):
        scale = max(1.0, abs(lhs), abs(rhs))
        if abs(lhs.imag) > 1e-9 * scale or abs(rhs.imag) > 1e-9 * scale or abs(lhs - rhs) < 1e-6 * scale:
            return None
        truths.append(lhs.real > rhs.real)
    return truths[0] != truths[1]


def _numerically_different(gold_form: tuple, pred_form: tuple) -> bool:
    """A cheap necessary condition for the official equality: simplify keeps a value, so two programs that
    differ at random points (all the points where both are defined) cannot simplify to the same thing."""
    verdicts = [_differs(_numeric_value(*gold_form, point), _numeric_value(*pred_form, point)) for point in _POINTS]
    settled = [verdict for verdict in verdicts if verdict is not None]
    return bool(settled) and all(settled)


def programs_equivalent(pred_program, gold_program) -> bool:
    """The official equal_program: the two programs are the same sympy expression after simplify, over
    symbols for the gold program's number arguments and table steps. Never raises."""
    try:
        return _programs_equivalent(pred_program, gold_program)
    except Exception:  # sympy can fail on odd expressions; the official script answers False then
        return False


def _programs_equivalent(pred_program, gold_program) -> bool:
    import sympy

    gold_tokens, pred_tokens = _as_tokens(gold_program), _as_tokens(pred_program)
    if gold_tokens is None or pred_tokens is None or not all(isinstance(t, str) for t in gold_tokens):
        return False
    gold = _gold_form(tuple(gold_tokens))
    if gold is None or _structure_error(pred_tokens):
        return False
    gold_steps, _, sym_map = gold
    steps = _raw_steps(pred_tokens)
    if not steps or len(steps) > MAX_STEPS:
        return False
    parsed = [_parse_step(step) for step in steps]
    if any(p is None for p in parsed) or not _pred_fits(steps, parsed, sym_map):
        return False
    if _steps_size(parsed, MAX_EXPR_NODES) is None:
        return False
    pred_expression = _expression(steps, parsed, sym_map)
    if steps == gold_steps:
        return True  # same steps, same expression: skip sympy's (slow) simplify
    if _numerically_different(gold, (steps, parsed, sym_map)):
        return False
    gold_simplified = _gold_simplified(tuple(gold_tokens))
    if gold_simplified is None:
        return False
    return sympy.simplify(pred_expression) == gold_simplified


def program_accuracy(pred_program, gold_program, table, exe_ans) -> bool:
    """The official program accuracy: equivalent to the gold program AND executes to exe_ans."""
    result = execute_program(pred_program, table)
    if not (result.valid and results_match(result.value, exe_ans)):
        return False  # checked first: it is cheap and sympy is not
    return programs_equivalent(pred_program, gold_program)
