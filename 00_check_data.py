"""Stage 00: validate raw FinQA before anything is trained on it.

Checks the schema of every entry, counts, length statistics and the operator histogram, and executes every
gold program, reporting how many reproduce exe_ans. Writes summary.json and samples.json to
outputs/<run_id>/00_data_validation/. Exits non-zero when the data cannot be used.
"""
from collections import Counter
from pathlib import Path

import numpy as np

from utils.cli import main_guard, resolve_config, setup_logging, stage_dir, stage_parser
from utils.contexts import gold_context
from utils.finqa_data import OFFICIAL_TEST, DataError, duplicate_ids, entry_id, entry_problem, load_raw_split, \
    raw_files
from utils.finqa_program import execute_program, program_steps, results_match
from utils.runs import stage_run, write_json_atomic
from utils.stages import STAGES

STAGE = STAGES["check_data"]

N_SAMPLES = 3


def length_stats(values: list[int]) -> dict:
    if not values:
        return {}
    array = np.asarray(values)
    return {"min": int(array.min()), "mean": round(float(array.mean()), 2), "median": float(np.median(array)),
            "p95": float(np.percentile(array, 95)), "max": int(array.max())}


def check_split(entries: list, context_mode: str = "gold") -> tuple[dict, list]:
    invalid, mismatches, ops = [], [], Counter()
    lengths = {"question_words": [], "gold_context_words": [], "full_text_words": [], "table_rows": [],
               "program_steps": []}
    n_executed = n_match = 0
    valid_entries = []
    for index, entry in enumerate(entries):
        problem = entry_problem(entry, context_mode)
        if problem:
            invalid.append({"id": entry_id(entry, index), "reason": problem})
            continue
        valid_entries.append(entry)
        qa = entry["qa"]
        steps = program_steps(qa["program"])
        ops.update(op for op, _, _ in steps)
        lengths["question_words"].append(len(qa["question"].split()))
        if entry["qa"].get("gold_inds"):
            lengths["gold_context_words"].append(len(gold_context(entry).text.split()))
        lengths["full_text_words"].append(len(" ".join(entry["pre_text"] + entry["post_text"]).split()))
        lengths["table_rows"].append(len(entry["table"]))
        lengths["program_steps"].append(len(steps))
        result = execute_program(qa["program"], entry["table"])
        if result.valid:
            n_executed += 1
        if result.valid and results_match(result.value, qa["exe_ans"]):
            n_match += 1
        else:
            mismatches.append({"id": entry["id"], "program": qa["program"], "exe_ans": qa["exe_ans"],
                               "executed": result.value, "error": result.error})
    duplicates = duplicate_ids(entries)
    summary = {
        "n_entries": len(entries),
        "duplicate_ids": duplicates,  # 01 refuses a split with any (an id must name one example)
        "n_valid": len(valid_entries),
        "n_invalid": len(invalid),
        "invalid_entries": invalid,
        "gold_program_check": {"n_checked": len(valid_entries), "n_executed": n_executed,
                               "n_match_exe_ans": n_match, "mismatches": mismatches},
        "lengths": {name: length_stats(values) for name, values in lengths.items()},
        "op_histogram": dict(ops.most_common()),
    }
    return summary, valid_entries[:N_SAMPLES]


def main() -> int:
    parser = stage_parser(__doc__, STAGE)
    parser.add_argument("--finqa_dir", default=None, help="folder with FinQA's train/dev/test.json "
                                                          "(default: the config's data.raw_dir)")
    args = parser.parse_args()
    config = resolve_config(args)
    raw_dir = Path(args.finqa_dir or config["data"]["raw_dir"])
    log = setup_logging()

    with stage_run(STAGE.manifest_name, stage_dir(args, config, STAGE.key), config, args.seed,
                   overwrite=args.overwrite, keep_partial=False) as run:
        summary, samples = {"splits": {}}, {}
        for split, file_name in raw_files(raw_dir).items():
            entries = load_raw_split(raw_dir / file_name)
            run.add_input(split, raw_dir / file_name)
            # official_test is only ever built with full or retrieved contexts: gold_inds is optional there
            mode = "full" if split == OFFICIAL_TEST else config["data"]["context_mode"]
            split_summary, samples[split] = check_split(entries, mode)
            summary["splits"][split] = split_summary
            check = split_summary["gold_program_check"]
            log.info("%s: %d entries, %d invalid, gold programs reproducing exe_ans: %d/%d", split,
                     split_summary["n_entries"], split_summary["n_invalid"], check["n_match_exe_ans"],
                     check["n_checked"])
            if split_summary["duplicate_ids"]:
                log.warning("%s: ids naming more than one entry: %s", split, ", ".join(split_summary["duplicate_ids"]))
            if split_summary["n_valid"] == 0:
                raise DataError(f"{raw_dir / file_name}: no usable entries")

        totals = {key: sum(s[key] for s in summary["splits"].values())
                  for key in ("n_entries", "n_valid", "n_invalid")}
        totals["n_gold_match_exe_ans"] = sum(s["gold_program_check"]["n_match_exe_ans"]
                                             for s in summary["splits"].values())
        summary["totals"] = totals
        write_json_atomic(run.add_output("summary", run.dir / "summary.json"), summary)
        write_json_atomic(run.add_output("samples", run.dir / "samples.json"), samples)
        run.metrics.update(totals)
        run.metrics["gold_execution_rate"] = round(totals["n_gold_match_exe_ans"] / max(totals["n_valid"], 1), 5)
        log.info("all splits: %s", totals)
    return 0


if __name__ == "__main__":
    main_guard(main)
