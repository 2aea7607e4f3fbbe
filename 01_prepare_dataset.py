"""Stage 01: turn raw FinQA into the processed jsonl every later stage reads.

Writes <data.processed_dir>/{train,val,test}.jsonl (default datasets/finqa_processed/) with the chat messages,
the gold program and answer, exe_ans and the table. The context is FinQA's gold evidence (data.context_mode:
gold) or the whole report cut to data.max_prompt_tokens (full). Entries that cannot be used (bad schema, or a
gold program that does not reproduce exe_ans) are skipped, counted and listed by id in the manifest.
"""
import hashlib
import json
from pathlib import Path

from utils.cli import UsageError, main_guard, resolve_config, setup_logging, stage_dir, stage_parser
from utils.finqa_data import (RAW_FILES, DataError, build_example, entry_id, entry_problem, full_context,
                              gold_context, load_raw_split, write_jsonl)
from utils.finqa_program import execute_program, results_match
from utils.models import load_tokenizer
from utils.prompts import render_prompt
from utils.runs import StageError, sha256_file, stage_run


def process_split(entries: list, context_mode: str, tokenizer, budget: int) -> tuple[list, list]:
    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    rows, skipped = [], []
    for index, entry in enumerate(entries):
        problem = entry_problem(entry)
        if problem is None:
            result = execute_program(entry["qa"]["program"], entry["table"])
            if not (result.valid and results_match(result.value, entry["qa"]["exe_ans"])):
                problem = f"gold program does not reproduce exe_ans ({result.error or result.value})"
        if problem:
            skipped.append({"id": entry_id(entry, index), "reason": problem})
            continue
        if context_mode == "gold":
            context = gold_context(entry)
        else:
            # The budget is for the whole prompt: leave room for the instructions and the question.
            empty = build_example(entry, "", context_mode)
            overhead = count_tokens(render_prompt(tokenizer, empty["prompt"]))
            context = full_context(entry, count_tokens, max(budget - overhead, 0))
        rows.append(build_example(entry, context, context_mode))
    return rows, skipped


def rows_sha256(rows: list) -> str:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return hashlib.sha256(text.encode()).hexdigest()


def main() -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--finqa_dir", default=None, help="folder with FinQA's train/dev/test.json "
                                                          "(default: the config's data.raw_dir)")
    args = parser.parse_args()
    config = resolve_config(args)
    data = config["data"]
    if data["context_mode"] == "retrieved":
        raise UsageError("data.context_mode 'retrieved' is not implemented yet; use gold or full")
    raw_dir, out_dir = Path(args.finqa_dir or data["raw_dir"]), Path(data["processed_dir"])
    log = setup_logging()
    tokenizer = load_tokenizer(config["model"]["path"])

    with stage_run("01_prepare_dataset", stage_dir(args, config, "prepare"), config, args.seed,
                   overwrite=args.overwrite, keep_partial=False) as run:
        processed, counts, skipped_by_split, prompt_tokens = {}, {}, {}, {}
        for split, file_name in RAW_FILES.items():
            entries = load_raw_split(raw_dir / file_name)
            run.add_input(split, raw_dir / file_name)
            rows, skipped = process_split(entries, data["context_mode"], tokenizer, data["max_prompt_tokens"])
            if not rows:
                raise DataError(f"{raw_dir / file_name}: no usable entries")
            processed[split] = rows
            counts[split] = {"n_raw": len(entries), "n_written": len(rows), "n_skipped": len(skipped)}
            skipped_by_split[split] = skipped
            lengths = sorted(len(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True,
                                                               tokenize=True, return_dict=True)["input_ids"])
                             for row in rows)
            prompt_tokens[split] = {"mean": round(sum(lengths) / len(lengths), 1),
                                    "max": lengths[-1], "n_over_budget": sum(n > data["max_prompt_tokens"]
                                                                              for n in lengths)}
            log.info("%s: %d written, %d skipped, prompt tokens mean %.0f max %d", split, len(rows),
                     len(skipped), prompt_tokens[split]["mean"], prompt_tokens[split]["max"])

        # Never silently replace processed files that differ (another run may be using them).
        for split, rows in processed.items():
            path = out_dir / f"{split}.jsonl"
            if path.exists() and sha256_file(path) != rows_sha256(rows) and not args.overwrite:
                raise StageError(f"{path} exists with different content (another context mode or data?); "
                                 f"pass --overwrite to replace it or set data.processed_dir")
        for split, rows in processed.items():
            path = out_dir / f"{split}.jsonl"
            write_jsonl(path, rows)
            run.add_output(split, path)
            run.outputs[f"{split}_sha256"] = sha256_file(path)

        run.extra["skipped_entries"] = skipped_by_split
        run.metrics.update({"counts": counts, "prompt_tokens": prompt_tokens,
                            "n_skipped": sum(c["n_skipped"] for c in counts.values())})
    return 0


if __name__ == "__main__":
    main_guard(main)
