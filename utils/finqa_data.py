"""FinQA data: reading and validating the raw json, building contexts, and the processed jsonl files.

Raw FinQA entries (czyssrs/FinQA format): id, pre_text, post_text, table, qa{question, program, exe_ans,
gold_inds, answer, ...}. Processed rows (datasets/finqa_processed/{train,val,test}.jsonl) carry what every
later stage needs: the chat messages (prompt / completion, trl's conversational prompt-completion format), the
gold program and answer, exe_ans and the table (for table ops in the reward).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

from utils.prompts import completion_messages, prompt_messages
from utils.files import read_json, write_atomic, write_json_atomic
from utils.runs import StageError

# processed split name -> FinQA's file name
RAW_FILES = {"train": "train.json", "val": "dev.json", "test": "test.json"}
# FinQA's real test split (../shared/finqa_core/official_test.json): optional, and built in the full and retrieved
# settings only, since most of its entries carry no gold_inds.
OFFICIAL_TEST, OFFICIAL_TEST_FILE = "official_test", "official_test.json"


def raw_files(raw_dir: Path) -> dict[str, str]:
    """The splits a raw folder holds: train, val, test, and official_test where its file is there."""
    extra = {OFFICIAL_TEST: OFFICIAL_TEST_FILE} if (Path(raw_dir) / OFFICIAL_TEST_FILE).is_file() else {}
    return {**RAW_FILES, **extra}
PROCESSED_FIELDS = ("id", "question", "input_text", "prompt", "completion", "target_program", "target_answer",
                    "exe_ans", "table", "context_mode")


class DataError(StageError):
    """The data cannot be used (missing file, not JSON, wrong shape): one line naming the file or entry."""


def _utf8(raw: bytes, path: Path, line_no: int | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        where = f"{path}:{line_no}" if line_no is not None else str(path)
        raise DataError(f"{where}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start})") from None


def load_raw_split(path: str | Path) -> list:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"FinQA file not found: {path} (run download.sh, or pass --finqa_dir)")
    try:
        data = json.loads(_utf8(path.read_bytes(), path))
    except ValueError as err:  # not JSON, or an integer past Python's digit limit
        raise DataError(f"{path}: not valid JSON ({str(err).splitlines()[0][:200]})") from None
    except RecursionError:
        raise DataError(f"{path}: not a FinQA file (JSON nested too deeply to read)") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of FinQA entries, got {type(data).__name__}")
    return data


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def entry_problem(entry: Any, context_mode: str = "gold") -> str | None:
    """Why a raw entry cannot be used, or None when its schema is fine. gold_inds is required only for the
    gold context; qa.answer is optional (the completion then shows exe_ans)."""
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
    problem = exe_ans_problem(qa.get("exe_ans"))
    if problem:
        return f"'qa.exe_ans' {problem}"
    if "answer" in qa and (isinstance(qa["answer"], bool) or not isinstance(qa["answer"], (str, int, float))):
        return "'qa.answer' is not a string"
    gold = qa.get("gold_inds")
    if gold is None and context_mode != "gold":
        return None
    if not isinstance(gold, dict) or not all(isinstance(v, str) for v in gold.values()):
        return "'qa.gold_inds' is not an object of strings" if gold is not None else \
            "no 'qa.gold_inds' (needed for data.context_mode gold)"
    return None


def exe_ans_problem(exe_ans: Any) -> str | None:
    """exe_ans must be a finite number or "yes"/"no" (what FinQA's script can match)."""
    if isinstance(exe_ans, bool) or not isinstance(exe_ans, (int, float, str)):
        return "is not a number or yes/no"
    if isinstance(exe_ans, str) and exe_ans not in ("yes", "no"):
        return f"is the string {exe_ans!r}, not a number or yes/no"
    if isinstance(exe_ans, float) and not math.isfinite(exe_ans):
        return f"is {exe_ans}, not a finite number"
    return None


def duplicate_ids(entries: list) -> list[str]:
    """Ids that name more than one entry, in order of first appearance."""
    counts = Counter(entry["id"] for entry in entries if isinstance(entry, dict) and isinstance(entry.get("id"), str))
    return [entry_id for entry_id, count in counts.items() if count > 1]


def entry_id(entry: Any, index: int) -> str:
    return entry["id"] if isinstance(entry, dict) and isinstance(entry.get("id"), str) else f"#{index}"


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
    write_atomic(path, lambda handle: handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl_lines(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; one error line naming file:line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    rows = []
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, 1):
            line = _utf8(raw, path, line_no)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:  # not JSON, or an integer past Python's digit limit
                raise DataError(f"{path}:{line_no}: not valid JSON ({str(err).splitlines()[0][:200]})") from None
            except RecursionError:
                raise DataError(f"{path}:{line_no}: JSON nested too deeply to read") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object")
            rows.append((line_no, row))
    return rows


def read_jsonl(path: str | Path) -> list[dict]:
    return [row for _, row in read_jsonl_lines(path)]


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def processed_row_problem(row: dict) -> str | None:
    """Why a processed row cannot be scored or prompted (missing fields, wrong types), or None."""
    missing = [field for field in PROCESSED_FIELDS if field not in row]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key in ("id", "question", "input_text", "target_program", "target_answer", "context_mode"):
        if not isinstance(row[key], str) or (key in ("id", "target_program") and not row[key].strip()):
            return f"'{key}' is not a{' non-empty' if key in ('id', 'target_program') else ''} string"
    for key in ("prompt", "completion"):
        if not _is_messages(row[key]):
            return f"'{key}' is not a list of chat messages ({{role, content}})"
    problem = exe_ans_problem(row["exe_ans"])
    if problem:
        return f"'exe_ans' {problem}"
    if not isinstance(row["table"], list) or not all(_is_str_list(r) for r in row["table"]):
        return "'table' is not a list of rows of strings"
    return None


def load_processed(path: str | Path, limit: int | None = None) -> list[dict]:
    """Processed rows, checked for the fields (and their types) later stages rely on, with unique ids."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"{path}: a limit on the examples must be a whole number >= 1 (or null: all), got {limit!r}")
    rows, seen = [], {}
    for line_no, row in read_jsonl_lines(path):
        problem = processed_row_problem(row)
        if problem:
            raise DataError(f"{path}:{line_no}: entry {row.get('id', '?')!s:.80} {problem} "
                            f"(re-run 01_prepare_dataset.py)")
        if row["id"] in seen:
            raise DataError(f"{path}:{line_no}: id {row['id']} already on line {seen[row['id']]} "
                            f"(an id names one example)")
        seen[row["id"]] = line_no
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows[:limit] if limit else rows


# The processed splits are one set, built by one 01 run in one setting: processed_set.json, written after every
# split, names each split file with its sha256 and the data settings that shaped the rows. A split whose file does
# not match it (01 killed between two writes, a file edited by hand) or a setting that differs from the reader's
# config (data.context_mode full on rows built in gold) is refused by every reader (utils.stage_inputs).
PROCESSED_SET = "processed_set.json"
ROW_SETTINGS = ("context_mode", "max_prompt_tokens", "retrieval_top_k")  # the data.* keys 01 builds rows with


def write_processed_set(folder: Path, data: dict, splits: dict[str, str]) -> Path:
    """Commit a processed set: splits maps a split to its file's sha256 (the files are already written)."""
    path = Path(folder) / PROCESSED_SET
    write_json_atomic(path, {"written_by": "01_prepare_dataset", "settings": {k: data[k] for k in ROW_SETTINGS},
                             "splits": {split: {"file": f"{split}.jsonl", "sha256": digest}
                                        for split, digest in splits.items()}})
    return path


def processed_set_problem(folder: Path) -> str | None:
    """Why folder's processed_set.json is not one 01 wrote (so 01 must not replace it), or None (ours or absent)."""
    path = Path(folder) / PROCESSED_SET
    if not path.exists() and not path.is_symlink():
        return None
    try:
        record = None if path.is_symlink() else read_json(path)
    except StageError:
        record = None
    if not (isinstance(record, dict) and record.get("written_by") == "01_prepare_dataset"
            and isinstance(record.get("settings"), dict) and isinstance(record.get("splits"), dict)):
        return f"{path} is not a processed set 01_prepare_dataset.py wrote"
    return None


def check_processed_split(folder: Path, split: str, data: dict, digest: Callable[[Path], str]) -> Path:
    """The split's file, if it belongs to the complete processed set in folder and was built with the reader's
    data settings; one DataError saying what to re-run otherwise."""
    folder, path = Path(folder), Path(folder) / f"{split}.jsonl"
    problem = processed_set_problem(folder)
    if problem:
        raise DataError(problem + "; re-run 01_prepare_dataset.py with another data.processed_dir")
    set_path = folder / PROCESSED_SET
    if not set_path.is_file():
        raise DataError(f"{set_path} not found: {folder} holds no complete processed set (01_prepare_dataset.py "
                        f"was interrupted, or an older version wrote it); re-run 01_prepare_dataset.py")
    record = read_json(set_path)
    entry = record["splits"].get(split)
    if not isinstance(entry, dict) or entry.get("file") != path.name:
        raise DataError(f"{path} is not part of the processed set in {set_path} (it holds "
                        f"{', '.join(record['splits']) or 'no split'}); re-run 01_prepare_dataset.py")
    if digest(path) != entry.get("sha256"):
        raise DataError(f"{path} does not match the processed set ({set_path}): 01_prepare_dataset.py was "
                        f"interrupted while writing it, or the file was changed; re-run 01_prepare_dataset.py")
    built = record["settings"]
    different = [f"data.{k} is {data.get(k)!r} here but {built.get(k)!r} there" for k in ROW_SETTINGS
                 if built.get(k) != data.get(k)]
    if different:
        raise DataError(f"{folder} was built with other data settings ({'; '.join(different)}, {set_path}): the "
                        f"recorded configuration would not be the one the rows were made with; set them as 01 did, "
                        f"or build another data.processed_dir with 01_prepare_dataset.py")
    return path


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
