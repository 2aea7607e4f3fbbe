"""FinQA data: reading and validating the raw json, building contexts, and the processed jsonl files.

Raw FinQA entries (czyssrs/FinQA format): id, pre_text, post_text, table, qa{question, program, exe_ans,
gold_inds, answer, ...}. Processed rows (datasets/finqa_processed/{train,val,test}.jsonl) carry what every
later stage needs: the chat messages (prompt / completion, trl's conversational prompt-completion format), the
gold program and answer, exe_ans and the table (for table ops in the reward).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from utils.prompts import completion_messages, prompt_messages
from utils.runs import StageError

# processed split name -> FinQA's file name
RAW_FILES = {"train": "train.json", "val": "dev.json", "test": "test.json"}
PROCESSED_FIELDS = ("id", "question", "input_text", "prompt", "completion", "target_program", "target_answer",
                    "exe_ans", "table", "context_mode")


class DataError(StageError):
    """The data cannot be used (missing file, not JSON, wrong shape): one line naming the file or entry."""


def load_raw_split(path: str | Path) -> list:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"FinQA file not found: {path} (run download.sh, or pass --finqa_dir)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of FinQA entries, got {type(data).__name__}")
    return data


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def entry_problem(entry: Any) -> str | None:
    """Why a raw entry cannot be used, or None when its schema is fine."""
    if not isinstance(entry, dict):
        return f"entry is a {type(entry).__name__}, not an object"
    if not isinstance(entry.get("id"), str) or not entry["id"]:
        return "missing or empty 'id'"
    for key in ("pre_text", "post_text"):
        if not _is_str_list(entry.get(key)):
            return f"'{key}' is not a list of strings"
    table = entry.get("table")
    if not isinstance(table, list) or not all(_is_str_list(row) and row for row in table):
        return "'table' is not a list of non-empty rows of strings"
    qa = entry.get("qa")
    if not isinstance(qa, dict):
        return "missing 'qa' object"
    if not isinstance(qa.get("question"), str) or not qa["question"].strip():
        return "missing or empty 'qa.question'"
    if not isinstance(qa.get("program"), str) or not qa["program"].strip():
        return "missing or empty 'qa.program'"
    exe_ans = qa.get("exe_ans")
    if isinstance(exe_ans, bool) or not isinstance(exe_ans, (int, float, str)):
        return "'qa.exe_ans' is not a number or yes/no"
    if isinstance(exe_ans, str) and exe_ans not in ("yes", "no"):
        return f"'qa.exe_ans' is the string {exe_ans!r}, not a number or yes/no"
    gold = qa.get("gold_inds")
    if not isinstance(gold, dict) or not all(isinstance(v, str) for v in gold.values()):
        return "'qa.gold_inds' is not an object of strings"
    return None


def entry_id(entry: Any, index: int) -> str:
    return entry["id"] if isinstance(entry, dict) and isinstance(entry.get("id"), str) else f"#{index}"


def table_row_text(row: list[str]) -> str:
    return " | ".join(cell.strip() for cell in row)


def gold_context(entry: dict) -> str:
    """FinQA's gold evidence (gold_inds): the annotated sentences and linearised table rows."""
    return "\n".join(text.strip() for text in entry["qa"]["gold_inds"].values())


def full_context(entry: dict, count_tokens, budget: int) -> str:
    """All text and the table, in the report's order, cut to a token budget.

    The table is kept first (table ops need its row names), then sentences in their order until the budget is
    spent; what is kept stays in the report's order.
    """
    table_lines = ["Table:"] + [table_row_text(row) for row in entry["table"]]
    used = sum(count_tokens(line) + 1 for line in table_lines)
    keep_pre, keep_post = [], []
    for source, kept in ((entry["pre_text"], keep_pre), (entry["post_text"], keep_post)):
        for sentence in source:
            sentence = sentence.strip()
            if not sentence or sentence == ".":
                continue
            cost = count_tokens(sentence) + 1
            if used + cost <= budget:
                kept.append(sentence)
                used += cost
    lines = keep_pre + table_lines + keep_post
    # A table alone may exceed the budget: cut it line by line from the end.
    while len(lines) > 1 and sum(count_tokens(line) + 1 for line in lines) > budget:
        lines.pop()
    return "\n".join(lines)


def answer_text(qa: dict) -> str:
    answer = qa.get("answer")
    if isinstance(answer, str) and answer.strip():
        return answer.strip()
    return str(qa["exe_ans"])


def build_example(entry: dict, context: str, context_mode: str) -> dict:
    qa = entry["qa"]
    messages = prompt_messages(qa["question"].strip(), context)
    program = qa["program"].strip()
    answer = answer_text(qa)
    return {
        "id": entry["id"],
        "question": qa["question"].strip(),
        "input_text": messages[-1]["content"],
        "prompt": messages,
        "completion": completion_messages(program, answer),
        "target_program": program,
        "target_answer": answer,
        "exe_ans": qa["exe_ans"],
        "table": entry["table"],
        "context_mode": context_mode,
    }


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Atomic: the file is either the old one or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    rows = []
    with open(path) as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object")
            rows.append(row)
    return rows


def load_processed(path: str | Path, limit: int | None = None) -> list[dict]:
    """Processed rows, checked for the fields later stages rely on."""
    rows = read_jsonl(path)
    for row in rows:
        missing = [field for field in PROCESSED_FIELDS if field not in row]
        if missing:
            raise DataError(f"{path}: entry {row.get('id', '?')} lacks {', '.join(missing)} "
                            f"(re-run 01_prepare_dataset.py)")
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows[:limit] if limit else rows


def hf_dataset(rows: list[dict], columns: Iterable[str]):
    """A datasets.Dataset of the given columns. exe_ans becomes a string, since Arrow columns cannot mix
    numbers with FinQA's yes/no answers; the reward parses it back."""
    from datasets import Dataset

    columns = list(columns)
    records = []
    for row in rows:
        record = {column: row[column] for column in columns}
        if "exe_ans" in record:
            record["exe_ans"] = str(record["exe_ans"])
        records.append(record)
    return Dataset.from_list(records)
