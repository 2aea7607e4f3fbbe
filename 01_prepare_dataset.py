"""Stage 01: turn raw FinQA into the processed jsonl every later stage reads.

Writes <data.processed_dir>/{train,val,test}.jsonl (default datasets/finqa_processed/) with the chat messages,
the gold program and answer, exe_ans and the table. The context (utils/contexts.py) is FinQA's gold evidence
(data.context_mode: gold), the whole report cut to data.max_prompt_tokens (full), or the question's
data.retrieval_top_k best sentences and table rows by BM25 within the same budget (retrieved); the manifest
records, per split, how much of the gold evidence the contexts kept. official_test.jsonl (FinQA's real test
split) is built too where data.raw_dir holds official_test.json, in the full and retrieved settings only. Train
entries that cannot be used (bad schema, or a gold program that does not reproduce exe_ans) are skipped, counted
and listed by id in the manifest. Val and test are never made smaller: an entry that cannot be prompted there is
an error naming the ids, and an entry whose gold program does not reproduce exe_ans is kept (FinQA's official
evaluation scores it) and listed. An id must name one entry: a split with duplicate ids is refused.
The splits are one set: processed_set.json, written after them, names each split's sha256 and the data settings
the rows were built with, and every stage that reads a split checks it against that record (a set 01 did not
finish, or a reader configured with another data.context_mode, is refused).
"""
import hashlib
import json
from pathlib import Path

from utils.cli import main_guard, resolve_config, setup_logging, stage_dir, stage_parser
from utils.contexts import evidence_kept, prompt_context, summarize_evidence
from utils.finqa_data import (OFFICIAL_TEST, DataError, build_example, duplicate_ids, entry_id, entry_problem,
                              load_raw_split, processed_set_problem, raw_files, write_jsonl, write_processed_set)
from utils.finqa_program import execute_program, results_match
from utils.models import load_tokenizer
from utils.runs import StageError, sha256_file, stage_run
from utils.stages import STAGES

STAGE = STAGES["prepare"]


def gold_reproduces(entry: dict) -> bool:
    result = execute_program(entry["qa"]["program"], entry["table"])
    return result.valid and results_match(result.value, entry["qa"]["exe_ans"])


def process_split(split: str, path: Path, entries: list, data: dict, tokenizer) -> tuple[list, dict]:
    """The processed rows of one split, what was left out (train only) or kept with a note, and how much of the
    gold evidence the contexts kept."""
    context_mode = data["context_mode"]
    duplicates = duplicate_ids(entries)
    if duplicates:
        raise DataError(f"{path}: {len(duplicates)} id(s) name more than one entry, e.g. {', '.join(duplicates[:5])}"
                        f" (an id must name one example)")
    rows, skipped, unusable, not_reproducing, evidence = [], [], [], [], []
    for index, entry in enumerate(entries):
        problem = entry_problem(entry, context_mode)
        if problem:
            unusable.append({"id": entry_id(entry, index), "reason": problem})
            continue
        if not gold_reproduces(entry):
            not_reproducing.append(entry["id"])
            if split == "train":  # nothing to learn from a gold answer its own program does not give
                skipped.append({"id": entry["id"], "reason": "gold program does not reproduce exe_ans"})
                continue
        context = prompt_context(entry, data, tokenizer)
        evidence.append(evidence_kept(entry, context))
        rows.append(build_example(entry, context.text, context_mode))
    if unusable and split != "train":
        raise DataError(f"{path}: {len(unusable)} of {len(entries)} entries cannot be used in the "
                        f"{context_mode} setting, and {split} is never made smaller: "
                        + "; ".join(f"{u['id']}: {u['reason']}" for u in unusable[:5])
                        + (" ..." if len(unusable) > 5 else ""))
    return rows, {"skipped": unusable + skipped, "gold_not_reproducing": not_reproducing,
                  "evidence": summarize_evidence(evidence)}


def rows_sha256(rows: list) -> str:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return hashlib.sha256(text.encode()).hexdigest()


def main() -> int:
    parser = stage_parser(__doc__, STAGE)
    parser.add_argument("--finqa_dir", default=None, help="folder with FinQA's train/dev/test.json "
                                                          "(default: the config's data.raw_dir)")
    args = parser.parse_args()
    config = resolve_config(args)
    data = config["data"]
    raw_dir, out_dir = Path(args.finqa_dir or data["raw_dir"]), Path(data["processed_dir"])
    log = setup_logging()
    tokenizer = load_tokenizer(config["model"]["path"])

    with stage_run(STAGE.manifest_name, stage_dir(args, config, STAGE.key), config, args.seed,
                   overwrite=args.overwrite, keep_partial=False) as run:
        processed, counts, skipped_by_split, prompt_tokens, not_reproducing, evidence = {}, {}, {}, {}, {}, {}
        for split, file_name in raw_files(raw_dir).items():
            entries = load_raw_split(raw_dir / file_name)
            if split == OFFICIAL_TEST and data["context_mode"] == "gold":
                without = sum(not (isinstance(e, dict) and isinstance(e.get("qa"), dict) and e["qa"].get("gold_inds"))
                              for e in entries)
                run.extra["not_built"] = {split: f"{without} of {len(entries)} entries of {file_name} have no "
                                                 f"gold_inds: build it with data.context_mode full or retrieved"}
                log.info("%s: not built in the gold setting (%s)", split, run.extra["not_built"][split])
                continue
            run.add_input(split, raw_dir / file_name)
            rows, left = process_split(split, raw_dir / file_name, entries, data, tokenizer)
            if not rows:
                raise DataError(f"{raw_dir / file_name}: no usable entries")
            skipped = left["skipped"]
            processed[split] = rows
            counts[split] = {"n_raw": len(entries), "n_written": len(rows), "n_skipped": len(skipped),
                             "n_gold_not_reproducing": len(left["gold_not_reproducing"])}
            skipped_by_split[split] = skipped
            not_reproducing[split] = left["gold_not_reproducing"]
            evidence[split] = left["evidence"]
            lengths = sorted(len(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True,
                                                               tokenize=True, return_dict=True)["input_ids"])
                             for row in rows)
            prompt_tokens[split] = {"mean": round(sum(lengths) / len(lengths), 1),
                                    "max": lengths[-1], "n_over_budget": sum(n > data["max_prompt_tokens"]
                                                                              for n in lengths)}
            log.info("%s: %d written, %d skipped, prompt tokens mean %.0f max %d, gold evidence all kept in %s of %d",
                     split, len(rows), len(skipped), prompt_tokens[split]["mean"], prompt_tokens[split]["max"],
                     evidence[split]["all_gold_kept"], evidence[split]["n_with_gold"])

        # Never silently replace processed files that differ (another run may be using them), nor a
        # processed_set.json 01 did not write.
        problem = processed_set_problem(out_dir)
        if problem:
            raise StageError(f"{problem}; move it away or set data.processed_dir")
        for split, rows in processed.items():
            path = out_dir / f"{split}.jsonl"
            if (path.exists() or path.is_symlink()) and not args.overwrite and \
                    (path.is_symlink() or sha256_file(path) != rows_sha256(rows)):
                raise StageError(f"{path} exists with different content (another context mode or data?); "
                                 f"pass --overwrite to replace it or set data.processed_dir")
        # The splits, then the set that names them: a kill in between leaves files the set does not match, which
        # every reader refuses (utils.finqa_data.check_processed_split) until 01 runs again.
        for split, rows in processed.items():
            path = out_dir / f"{split}.jsonl"
            write_jsonl(path, rows)
            run.add_output(split, path)
            run.outputs[f"{split}_sha256"] = sha256_file(path)
        run.add_output("processed_set", write_processed_set(
            out_dir, data, {split: run.outputs[f"{split}_sha256"] for split in processed}))

        run.extra["skipped_entries"] = skipped_by_split
        run.extra["gold_not_reproducing"] = not_reproducing  # kept in val/test (scored as FinQA does), not in train
        run.metrics.update({"counts": counts, "prompt_tokens": prompt_tokens, "gold_evidence_kept": evidence,
                            "n_skipped": sum(c["n_skipped"] for c in counts.values())})
    return 0


if __name__ == "__main__":
    main_guard(main)
