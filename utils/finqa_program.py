"""FinQA's program DSL: tokenizing, executing and comparing programs so that execution and program accuracy
give, item by item, the answers of FinQA's official evaluation script (czyssrs/FinQA,
code/evaluate/evaluate.py, run with this project's Python and sympy), written here without eval and with
bounded work.

A program is a list of steps `op(arg1, arg2)` joined by ", ", e.g. "subtract(5829, 5735), divide(#0, 5735)".
`#k` is the result of step k (from 0). Arguments are numbers ("5,829", "1.6%", "const_100") or, for the table
ops, a row name (the exact first cell of a table row) and "none".

How the official script works, and so how this module works:
- Tokens: "subtract(", "5829", "5735", ")", ..., "EOF". Every 4th token must be an op and every 4th+3 a ")".
  The tokens are joined with "|" and cut at ")"; the unclosed rest is dropped, so "add(1, 2), divide(#0" runs
  add(1, 2) only. A token list (predictions_official.json) loses its last token, whatever it is.
- Execution runs every step in order, used or not, with Python's own arithmetic on whatever the steps hold:
  greater gives "yes"/"no", and add on two such strings concatenates them ("yesno") without failing; a table op
  whose row is a #ref reuses the row of the previous table step; table_sum of an empty row is the int 0. The
  result is round(x, 5). A step that fails makes the program invalid, and the script then still holds the
  result of the last step that completed (rounded when the failure was a parse failure the script `break`s
  on, unrounded when it was an exception). That held value is what program accuracy compares: a program
  equivalent to the gold one whose execution fails after a step that produced exe_ans is program-correct and
  execution-wrong (ExecutionResult.official_value).
- Program equivalence: each distinct number argument and each distinct table step of the gold program is a
  symbol; the prediction may only use those, with backward #refs, in every step; then the expressions of the
  two final steps (only the steps they reach) go through sympy's simplify and are compared. The official script
  builds them as strings ("( a0 - a1 )") and sympifies them, which evaluates the operators; we apply sympy's
  operators to the already-built sub-expressions, which gives the same objects without the string (which shared
  #refs make exponentially long). sympify cannot parse a string nested 200 deep, so a final expression with
  200 or more nested steps is not equivalent, as officially.
- Program accuracy: equivalent, and the held result equals exe_ans (the official script asserts this and
  would stop; docs/design.md counts such an item as wrong). Execution accuracy: valid and the result equals exe_ans.

Bounds (the only deviations; each is where the official script itself needs minutes, hours or all the memory):
- strings built by concatenating yes/no results stop at MAX_TEXT_CHARS characters in all, integers (only
  from table_sum of an empty row and exp(0, 0)) at MAX_INT_BITS bits; past either the program is invalid;
- equivalence answers False when an expression handed to simplify, after sympy's automatic evaluation, has
  more than MAX_SIMPLIFY_NODES nodes (measured with this sympy: 15 s on 28,663 nodes, doubling with each
  nesting level) or a power above MAX_SIMPLIFY_POWER (simplify expands it: 6.5 s for (a0 + a1)**1024, 30 s
  for **4096; ten self-multiplications of a step give **1024);
- and when building and simplifying an expression takes more than MAX_CHECK_SECONDS of wall-clock time (the
  prediction's in each check, the gold program's once: it is cached). Small expressions can still be slow:
  a 387-character prediction (a sum of six symbolic powers, to the 8th, over another sum; tests/
  test_hostile_scoring.py) needs 40 s of simplify. The limit is a SIGALRM timer in the main thread (stages
  score there) and an exception raised into the thread by a watchdog thread elsewhere (Python runs signal
  handlers in the main thread only).
An item whose check meets any of these bounds counts as not program-equivalent: program accuracy False,
execution accuracy unaffected. equivalence() says so (bounded), RewardResult.program_check_bounded carries it,
and metrics.json counts such items (program_check_bounded). The verdict of every check that reaches sympy is
cached per (prediction, gold) token lists, so a program string and its official token list (10_evaluate.py's
two scoring routes) cost one check and get the same verdict whatever the clock did.
Before calling sympy, equivalence evaluates both programs at three random points and answers False when they
differ wherever both are defined: simplify keeps values, so such programs never simplify to the same thing.
"""
from __future__ import annotations

import cmath
import ctypes
import functools
import hashlib
import json
import random
import signal
import threading
import time
from collections import OrderedDict
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

MAX_TEXT_CHARS = 1 << 26       # characters of yes/no concatenations per program (26 doublings of "yes")
MAX_INT_BITS = 1 << 16         # integer results (table_sum of an empty row is the int 0, exp(0, 0) the int 1)
MAX_SIMPLIFY_NODES = 1 << 15   # sympy nodes of an expression handed to simplify
MAX_SIMPLIFY_POWER = 1 << 10   # integer exponents in it (2^k from k self-multiplications)
SYMPIFY_MAX_DEPTH = 199        # the deepest nesting of steps the official string can have and still parse
# Wall-clock seconds for one expression's simplify. Measured on this machine: the slowest of the 295 FinQA
# (finqa_core) gold programs checked against their commuted rewrites took 0.064 s (0.41 s for the first, which
# loads sympy's caches), the hostile prediction of the module docstring 40 s; 3 s keeps a margin of 45x.
MAX_CHECK_SECONDS = 3.0
MAX_CACHED_VERDICTS = 1 << 16  # sympy verdicts kept (16-byte keys): far more than a test split's items


@dataclass
class ExecutionResult:
    valid: bool
    value: float | int | str | None  # the result when valid: round(x, 5), or "yes"/"no"; else None
    error: str | None                # why it is invalid, for people reading failures
    # What the official script holds as the result when it stops: value when valid; when invalid, the result
    # of the last step that completed before the failure (or None). Program accuracy compares this with exe_ans.
    official_value: object = None


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


def _as_tokens(program) -> list | None:
    """What the official script works on: the tokens without their last one (a program string is tokenized,
    which ends it in "EOF"); None for anything else."""
    if isinstance(program, str):
        return tokenize_program(program)[:-1]
    if isinstance(program, (list, tuple)):
        return list(program)[:-1]
    return None


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _structure_error(tokens: list) -> str | None:
    """The official structure check: every 4th token is an op, every 4th+3 token is ")"; tokens are text."""
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


class _ParseFailure(Exception):
    """A step the official script cannot take apart (it raises there)."""


def _step_parts(step: str) -> tuple[str, str, str] | None:
    """"divide(|#0|5735|" -> ("divide", "#0", "5735"); None where the official script sees more than one
    "(" (it breaks off there); _ParseFailure where it raises (no "(", fewer than two arguments)."""
    parts = step.split("(")
    if len(parts) > 2:
        return None
    if len(parts) < 2:
        raise _ParseFailure(f"step {_short(step)} has no '('")
    args = parts[1].strip("|").strip().split("|")
    if len(args) < 2:
        raise _ParseFailure(f"step {_short(step)} has fewer than two arguments")
    return parts[0].strip("|").strip(), args[0].strip(), args[1].strip()


def program_steps(program) -> list[tuple[str, str, str]]:
    """Best-effort (op, arg1, arg2) list, skipping pieces that do not parse; [] for garbage. Never raises.
    (For partial credit in the reward; the official rules are in execute_program / programs_equivalent.)"""
    tokens = _as_tokens(program)
    if tokens is None or not all(isinstance(token, str) for token in tokens):
        return []
    steps = []
    for step in _raw_steps(tokens):
        try:
            parsed = _step_parts(step)
        except _ParseFailure:
            continue
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


def _official_number(text: str):
    """The official str_to_num: drop commas; float; "x%" -> x/100; "const_x" -> float(x) (const_m1 -> -1),
    which raises ValueError when x is not a number; anything else None (the script's "n/a")."""
    text = text.replace(",", "")
    number = _float_or_none(text)
    if number is not None:
        return number
    if "%" in text:
        number = _float_or_none(text.replace("%", ""))
        return None if number is None else number / 100.0
    if "const" in text:
        text = text.replace("const_", "")
        return float("-1" if text == "m1" else text)
    return None


def str_to_num(text) -> float | None:
    """str_to_num as a plain function: a float, or None where the official script gets "n/a" or raises."""
    if not isinstance(text, str):
        return None
    try:
        return _official_number(text)
    except ValueError:
        return None


def _official_row(cells):
    """The official process_row: per cell drop "$", cut at "(", then str_to_num; None if a cell is "n/a".
    Raises (like the script) on a cell that is not text or a bad const_ cell."""
    numbers = []
    for cell in cells:
        number = _official_number(cell.replace("$", "").strip().split("(")[0].strip())
        if number is None:
            return None
        numbers.append(number)
    return numbers


def table_row_to_numbers(cells) -> list[float] | None:
    """process_row as a plain function: the numbers, or None where the official script gets "n/a" or raises."""
    try:
        return _official_row(cells)
    except (AttributeError, TypeError, ValueError):
        return None


def results_match(value, exe_ans) -> bool:
    """The official comparison `exe_res == exe_ans`, on a result as execute_program holds it (already rounded
    to 5 decimals where the script rounds); yes/no compare as strings, nan equals nothing."""
    if isinstance(value, bool) or isinstance(exe_ans, bool) or value is None:
        return False
    if isinstance(value, str) or isinstance(exe_ans, str):
        return isinstance(value, str) and isinstance(exe_ans, str) and value == exe_ans
    if not isinstance(value, (int, float, complex)) or not isinstance(exe_ans, (int, float)):
        return False
    return value == exe_ans


# ----------------------------------------------------------------------------------------------------------
# execution

class _Failed(Exception):
    """A step fails; `rounds` says whether the official script still rounds what it holds (it breaks off on
    parse failures and rounds; it skips the rounding when it raises)."""

    def __init__(self, error: str, rounds: bool = False):
        super().__init__(error)
        self.rounds = rounds


class _Budget:
    """The bounds on what one program may build (see the module docstring)."""

    def __init__(self):
        self.text_chars = 0

    def text(self, length: int) -> None:
        self.text_chars += length
        if self.text_chars > MAX_TEXT_CHARS:
            raise _Failed(f"yes/no concatenations longer than {MAX_TEXT_CHARS} characters (the evaluator's bound)")

    @staticmethod
    def integer(value):
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise _Failed(f"an integer of more than {MAX_INT_BITS} bits (the evaluator's bound)")
        return value


def _reference(arg: str, results: dict, index: int):
    """res_dict[int(arg without "#")], raising where the official script does."""
    try:
        k = int(arg.replace("#", ""))
    except ValueError:
        raise _Failed(f"step {index} has a bad step reference {_short(arg)}") from None
    if k not in results:
        raise _Failed(f"step {index} refers to #{k}, which is not computed")
    return results[k]


def _operand(arg: str, results: dict, index: int):
    if "#" in arg:
        return _reference(arg, results, index)
    try:
        number = _official_number(arg)
    except ValueError:
        raise _Failed(f"step {index}: {_short(arg)} is not a number") from None
    if number is None:
        raise _Failed(f"step {index}: {_short(arg)} is not a number", rounds=True)
    return number


def _is_text(value) -> bool:
    return isinstance(value, str)


def _binary(op: str, a, b, index: int, budget: _Budget):
    """Python's `a <op> b` on what the steps hold (floats, complex numbers, yes/no text, the odd int), raising
    _Failed wherever Python raises, with the bounds applied before anything large is built."""
    where = f"step {index}: {op}"
    if op == "greater":
        if isinstance(a, complex) or isinstance(b, complex) or _is_text(a) != _is_text(b):
            raise _Failed(f"{where} compares values that cannot be compared")
        return "yes" if a > b else "no"
    if _is_text(a) or _is_text(b):
        if op == "add" and _is_text(a) and _is_text(b):
            budget.text(len(a) + len(b))
            return a + b
        if op == "multiply" and (_is_text(a) != _is_text(b)):
            text, count = (a, b) if _is_text(a) else (b, a)
            if isinstance(count, int):  # only an int repeats text; a float raises
                budget.text(len(text) * max(count, 0))
                return text * count
        raise _Failed(f"{where} on a yes/no result")
    try:
        if op == "add":
            return budget.integer(a + b)
        if op == "subtract":
            return budget.integer(a - b)
        if op == "multiply":
            return budget.integer(a * b)
        if op == "divide":
            return a / b
        if isinstance(a, int) and isinstance(b, int) and (abs(a).bit_length() - 1) * b > MAX_INT_BITS:
            raise _Failed(f"{where} gives an integer of more than {MAX_INT_BITS} bits (the evaluator's bound)")
        return a ** b  # float ** float is O(1): it overflows (raises) rather than hangs
    except ZeroDivisionError:
        raise _Failed(f"{where}: division by zero" if op == "divide" else f"{where}: zero to a negative power") \
            from None
    except OverflowError:
        raise _Failed(f"{where}: overflow") from None


def _table_step(op: str, arg1: str, results: dict, state: dict, table, index: int):
    """One table step. state["row"] is the official script's num_row, which outlives its step."""
    try:
        rows = {row[0]: row[1:] for row in table}
    except (IndexError, KeyError, TypeError):
        raise _Failed("malformed table") from None
    if "#" in arg1:
        _reference(arg1, results, index)  # official quirk: a #ref row keeps the previous table step's row
        if state.get("row") is None:
            raise _Failed(f"step {index}: {op} needs a row name, not {_short(arg1)}")
    else:
        if arg1 not in rows:
            raise _Failed(f"row {_short(arg1)} not in table", rounds=True)
        try:
            state["row"] = _official_row(rows[arg1])
        except (AttributeError, TypeError, ValueError):
            raise _Failed(f"row {_short(arg1)} has a cell that is not text or a number") from None
        if state["row"] is None:
            raise _Failed(f"row {_short(arg1)} has a cell that is not a number", rounds=True)
    numbers = state["row"]
    if op == "table_sum":
        return sum(numbers)
    if not numbers:
        raise _Failed(f"step {index}: {op} of a row without numbers")
    if op == "table_max":
        return max(numbers)
    if op == "table_min":
        return min(numbers)
    return sum(numbers) / len(numbers)


def _round_result(value):
    """The official final rounding; it raises on text other than yes/no and on complex numbers."""
    if value in ("yes", "no"):
        return value
    if isinstance(value, complex):
        raise _Failed("the result is a complex number")
    if _is_text(value):
        raise _Failed("the result is text, not a number or yes/no")
    return round(value, 5)


def execute_program(program: str | list[str], table: list[list[str]]) -> ExecutionResult:
    """Run a program (string, or official token list ending in "EOF") on a table, as the official script's
    eval_program does. Never raises."""
    tokens = _as_tokens(program)
    if tokens is None:
        return ExecutionResult(False, None, "program is neither a string nor a token list")
    error = _structure_error(tokens)
    if error:
        return ExecutionResult(False, None, error)
    steps = _raw_steps(tokens)
    results: dict[int, object] = {}
    state: dict = {}
    budget = _Budget()
    held = None  # the script's this_res ("n/a" there)
    failure: _Failed | None = None
    for index, step in enumerate(steps):
        try:
            parsed = _step_parts(step)
            if parsed is None:
                raise _Failed(f"step {index} has more than one '('", rounds=True)
            op, arg1, arg2 = parsed
            if op in BINARY_OPS:
                a = _operand(arg1, results, index)
                b = _operand(arg2, results, index)
                value = _binary(op, a, b, index, budget)
            elif "table" in op:
                value = _table_step(op, arg1, results, state, table, index)
            else:
                continue  # the official script does nothing with such a step
        except _ParseFailure as err:
            failure = _Failed(str(err))
            break
        except _Failed as err:
            failure = err
            break
        held = results[index] = value
    if held is not None and (failure is None or failure.rounds):
        try:
            held = _round_result(held)
        except _Failed as err:
            failure = failure or err
    if failure is not None:
        return ExecutionResult(False, None, str(failure), official_value=held)
    if held is None:
        return ExecutionResult(False, None, "empty program" if not steps else "no step computed a result")
    return ExecutionResult(True, held, None, official_value=held)


def execution_match(result: ExecutionResult, exe_ans) -> bool:
    """The official execution accuracy of one executed program."""
    return result.valid and results_match(result.value, exe_ans)


# ----------------------------------------------------------------------------------------------------------
# symbolic equivalence (official equal_program) and program accuracy

@dataclass(frozen=True)
class _Form:
    """A program as equal_program sees it: its step strings, parsed steps, and the steps its final step
    reaches (in order), each with the step indices its #refs name."""

    steps: tuple
    parsed: tuple
    reached: tuple   # ((index, ref1 or None, ref2 or None), ...) in dependency order, final last


def _reached_steps(parsed: list) -> tuple | None:
    """The steps the final step reaches through #refs (read as int(arg without "#"), as symbol_recur reads
    them), in dependency order, final last; None where that walk fails in the official script (a ref to no
    step, or a cycle: endless recursion)."""
    def refs(index: int) -> tuple:
        op, arg1, arg2 = parsed[index]
        found = []
        for arg in (arg1, arg2):
            if "table" in op or "#" not in arg:
                found.append(None)
                continue
            k = int(arg.replace("#", ""))  # ValueError: the script fails here too
            if not 0 <= k < len(parsed):
                raise KeyError(k)
            found.append(k)
        return tuple(found)

    visiting, done = object(), object()
    state: dict[int, object] = {}
    order: list[tuple] = []
    stack = [len(parsed) - 1]
    try:
        while stack:  # depth-first without recursion: a hostile program may chain thousands of steps
            index = stack[-1]
            if state.get(index) is done:
                stack.pop()
            elif state.get(index) is visiting:  # its refs are done
                state[index] = done
                order.append((index, *refs(index)))
                stack.pop()
            else:
                state[index] = visiting
                for k in refs(index):
                    if k is not None and state.get(k) is visiting:
                        return None
                    if k is not None and state.get(k) is None:
                        stack.append(k)
    except (KeyError, ValueError):
        return None
    return tuple(order)


def _depths_ok(form: _Form) -> bool:
    """sympify parses the official string only when its steps nest at most SYMPIFY_MAX_DEPTH deep."""
    depth: dict[int, int] = {}
    for index, ref1, ref2 in form.reached:
        depth[index] = 1 + max(depth[k] if k is not None else 0 for k in (ref1, ref2))
    return depth[form.reached[-1][0]] <= SYMPIFY_MAX_DEPTH


def _form(tokens: list) -> _Form | None:
    steps = _raw_steps(tokens)
    try:
        parsed = [_step_parts(step) for step in steps]
    except _ParseFailure:
        return None
    if not steps or any(p is None for p in parsed):
        return None
    reached = _reached_steps(parsed)
    if reached is None:
        return None
    return _Form(tuple(steps), tuple(parsed), reached)


@functools.lru_cache(maxsize=4096)
def _gold(gold_tokens: tuple) -> tuple[_Form, dict] | None:
    """The gold program's form and the official symbol map (first appearance -> "a0", "a1", ...): one symbol
    per distinct number argument and per distinct table step string, over all its steps. None where the
    official script would fail on the gold program itself (the item then counts as wrong)."""
    form = _form(list(gold_tokens))
    if form is None or not _depths_ok(form):
        return None
    sym_map: dict[str, str] = {}
    for step, (op, arg1, arg2) in zip(form.steps, form.parsed):
        names = [step] if "table" in op else [arg for arg in (arg1, arg2) if "#" not in arg]
        for name in names:
            sym_map.setdefault(name, f"a{len(sym_map)}")
    return form, sym_map


def _pred_fits(form: _Form, sym_map: dict) -> bool:
    """The official checks on every predicted step: table steps and number arguments occur in the gold
    program, #refs point backwards (read as int(arg.strip("#")))."""
    for index, (step, (op, arg1, arg2)) in enumerate(zip(form.steps, form.parsed)):
        if "table" in op:
            if step not in sym_map:
                return False
            continue
        for arg in (arg1, arg2):
            if "#" not in arg:
                if arg not in sym_map:
                    return False
                continue
            try:
                if int(arg.strip("#")) >= index:
                    return False
            except ValueError:
                return False
    return True


# Points at which both programs are evaluated before calling sympy: symbol "a<i>" gets _POINTS[k][i].
_POINTS = [[random.Random(1000 * k + i).uniform(1.5, 4.5) for i in range(256)] for k in range(3)]


def _numeric_value(form: _Form, sym_map: dict, point: list[float]):
    """The final step's value at a point, in complex arithmetic (sympy's symbols are complex, and its powers
    take the principal branch like Python's); for a final greater, the pair (lhs, rhs). None if undefined."""
    def symbol(name: str) -> complex:
        return complex(point[int(sym_map[name][1:]) % len(point)])

    values: dict[int, object] = {}
    for index, ref1, ref2 in form.reached:
        step, (op, arg1, arg2) = form.steps[index], form.parsed[index]
        if "table" in op:
            values[index] = symbol(step)
            continue
        a, b = [values[ref] if ref is not None else symbol(arg) for ref, arg in ((ref1, arg1), (ref2, arg2))]
        values[index] = _complex_step(op, a, b)
    return values[form.reached[-1][0]]


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


def _numerically_different(gold: _Form, pred: _Form, sym_map: dict) -> bool:
    verdicts = [_differs(_numeric_value(gold, sym_map, point), _numeric_value(pred, sym_map, point))
                for point in _POINTS]
    settled = [verdict for verdict in verdicts if verdict is not None]
    return bool(settled) and all(settled)


def _expression(form: _Form, sym_map: dict):
    """The sympy expression of the final step, built with sympy's operators on the sub-expressions exactly as
    sympify evaluates the official string "( a0 - a1 )". Raises TypeError where sympy does (a relational in
    arithmetic), as sympify does."""
    import sympy

    built: dict[int, object] = {}
    for index, ref1, ref2 in form.reached:
        step, (op, arg1, arg2) = form.steps[index], form.parsed[index]
        if "table" in op:
            built[index] = sympy.Symbol(sym_map[step])
            continue
        a, b = [built[ref] if ref is not None else sympy.Symbol(sym_map[arg]) for ref, arg in ((ref1, arg1),
                                                                                               (ref2, arg2))]
        if op == "add":
            built[index] = a + b
        elif op == "subtract":
            built[index] = a - b
        elif op == "multiply":
            built[index] = a * b
        elif op == "divide":
            built[index] = a / b
        elif op == "exp":
            built[index] = a ** b
        elif op == "greater":
            built[index] = a > b  # StrictGreaterThan; raises TypeError on relational operands, like sympify
        else:
            raise TypeError(f"no expression for op {op!r}")  # symbol_recur returns None: the script fails
    return built[form.reached[-1][0]]


def _too_big(expression) -> bool:
    """More than MAX_SIMPLIFY_NODES nodes (counted with repeats, as simplify walks them; stops early), or a
    power above MAX_SIMPLIFY_POWER (simplify expands powers of sums)."""
    count, stack = 0, [expression]
    while stack:
        count += 1
        node = stack.pop()
        if count > MAX_SIMPLIFY_NODES:
            return True
        if node.is_Pow and node.exp.is_Rational and max(abs(node.exp.p), node.exp.q) > MAX_SIMPLIFY_POWER:
            return True
        stack.extend(node.args)
    return False


class _OutOfTime(BaseException):
    """A check ran past MAX_CHECK_SECONDS. A BaseException, so that no `except Exception` on the way out (sympy
    has many, and so has programs_equivalent) takes it for sympy failing on the expression."""


_REFIRE_SECONDS = 0.05  # past the limit the alarm (or watchdog) fires again until the check is left


def _out_of_time(signum, frame):
    raise _OutOfTime


def _with_alarm(seconds: float, work):
    """work() in the main thread, stopped by SIGALRM after `seconds` (free while it waits). A timer someone else
    had set is set again afterwards with what is left of it (at once if that passed meanwhile). One function,
    not a context manager, so that no alarm can land between leaving work and disarming."""
    previous = signal.signal(signal.SIGALRM, _out_of_time)
    started, outer = time.monotonic(), (0.0, 0.0)
    try:
        outer = signal.setitimer(signal.ITIMER_REAL, seconds, _REFIRE_SECONDS)
        return work()
    finally:
        while True:  # an alarm can land while disarming: disarm again
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)  # (runs a pending handler, ours, first)
                break
            except _OutOfTime:
                pass
        if outer[0]:
            signal.setitimer(signal.ITIMER_REAL, max(outer[0] - (time.monotonic() - started), 1e-3), outer[1])


def _with_watchdog(seconds: float, work):
    """work() in this thread, stopped after `seconds` by _OutOfTime raised into it from a watchdog thread
    (CPython's PyThreadState_SetAsyncExc) and raised again every _REFIRE_SECONDS until work is left: one that
    lands where Python ignores exceptions (a gc callback, a __del__) is followed by the next. (A clock read on
    every call through sys.settrace stopped for good at the first such landing: Python turns tracing off when
    the trace function raises, and the check then ran unbounded.)"""
    thread_id, state = ctypes.c_ulong(threading.get_ident()), threading.Lock()
    left = threading.Event()

    def watchdog():
        if left.wait(seconds):
            return
        while True:
            with state:  # never fires once work is left
                if left.is_set():
                    return
                ctypes.pythonapi.PyThreadState_SetAsyncExc(thread_id, ctypes.py_object(_OutOfTime))
            left.wait(_REFIRE_SECONDS)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        return work()
    finally:
        while True:  # one can land while leaving: leave again
            try:
                with state:
                    left.set()
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(thread_id, None)  # drop one not yet delivered
                break
            except _OutOfTime:
                pass


def _within(seconds: float, work):
    """work(), or _OutOfTime once `seconds` of wall-clock time have passed."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer") \
            and signal.getsignal(signal.SIGALRM) is not None:  # None: a handler Python could not put back
        return _with_alarm(seconds, work)
    return _with_watchdog(seconds, work)


def _simplified(form: _Form, sym_map: dict):
    """sympy's simplify of the final step's expression, or None where a bound stops it (size, power, time)."""
    import sympy  # (outside the limit: the first import takes a while)

    def work():
        expression = _expression(form, sym_map)  # its automatic evaluation is sympy's work too
        return None if _too_big(expression) else sympy.simplify(expression)

    try:
        return _within(MAX_CHECK_SECONDS, work)
    except _OutOfTime:
        return None


@functools.lru_cache(maxsize=4096)
def _gold_simplified(gold_tokens: tuple):
    gold_form, sym_map = _gold(gold_tokens)
    return _simplified(gold_form, sym_map)


@dataclass(frozen=True)
class Equivalence:
    """The official equal_program's answer, and whether a bound of this module gave it (then it is False)."""

    equivalent: bool
    bounded: bool = False


_NOT_EQUIVALENT = Equivalence(False)
_verdicts: OrderedDict[bytes, Equivalence] = OrderedDict()  # sympy verdicts, least recently used first
_verdicts_lock = threading.Lock()


def _symbolic_verdict(gold_tokens: tuple, pred_tokens: list, pred_form: _Form, sym_map: dict) -> Equivalence:
    """sympy's verdict, cached by a digest of both token lists (programs can be long)."""
    key = hashlib.blake2b(json.dumps([gold_tokens, pred_tokens]).encode(), digest_size=16).digest()
    with _verdicts_lock:
        verdict = _verdicts.get(key)
        if verdict is not None:
            _verdicts.move_to_end(key)
            return verdict
    gold_simplified = _gold_simplified(gold_tokens)
    pred_simplified = _simplified(pred_form, sym_map) if gold_simplified is not None else None
    if gold_simplified is None or pred_simplified is None:
        verdict = Equivalence(False, bounded=True)
    else:
        verdict = Equivalence(pred_simplified == gold_simplified)
    with _verdicts_lock:
        _verdicts[key] = verdict
        if len(_verdicts) > MAX_CACHED_VERDICTS:
            _verdicts.popitem(last=False)
    return verdict


def equivalence(pred_program, gold_program) -> Equivalence:
    """The official equal_program(gold, pred), and whether a bound answered it. Never raises: where the
    official script raises on the prediction it answers False, and where it would raise on the gold program
    the item counts as wrong."""
    try:
        return _equivalence(pred_program, gold_program)
    except Exception:  # sympy fails on odd expressions (the official script catches it for the prediction)
        return _NOT_EQUIVALENT


def programs_equivalent(pred_program, gold_program) -> bool:
    """equivalence(...).equivalent."""
    return equivalence(pred_program, gold_program).equivalent


def _equivalence(pred_program, gold_program) -> Equivalence:
    gold_tokens, pred_tokens = _as_tokens(gold_program), _as_tokens(pred_program)
    if gold_tokens is None or pred_tokens is None or not all(isinstance(t, str) for t in gold_tokens):
        return _NOT_EQUIVALENT
    gold = _gold(tuple(gold_tokens))
    if gold is None or _structure_error(pred_tokens):
        return _NOT_EQUIVALENT
    gold_form, sym_map = gold
    pred_form = _form(pred_tokens)
    if pred_form is None or not _pred_fits(pred_form, sym_map) or not _depths_ok(pred_form):
        return _NOT_EQUIVALENT
    if pred_form.steps == gold_form.steps:  # the same steps give the same expression: skip sympy's simplify
        _expression(gold_form, sym_map)   # (unless building it fails, as sympify would)
        return Equivalence(True)
    if _numerically_different(gold_form, pred_form, sym_map):
        return _NOT_EQUIVALENT
    return _symbolic_verdict(tuple(gold_tokens), pred_tokens, pred_form, sym_map)


def program_accuracy(pred_program, gold_program, table, exe_ans) -> bool:
    """The official program accuracy: equivalent to the gold program, and what the official script holds as
    the result after running the prediction equals exe_ans (even when a later step made it invalid)."""
    held = execute_program(pred_program, table).official_value
    if not results_match(held, exe_ans):
        return False  # checked first: it is cheap and sympy is not
    return programs_equivalent(pred_program, gold_program)
