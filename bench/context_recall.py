"""How answerable is each context setting? The gold evidence that survives into the prompt, per split.

For every split of a raw FinQA folder and every prompt budget, builds the contexts 01 would build
(utils.contexts.prompt_context: the same budget rule, the default model's tokenizer and chat template) in the
`full` setting and in the `retrieved` setting at several top-k, and reports, over the entries that have gold_inds,
the fraction whose gold evidence all survived (an entry whose needed row was cut cannot be answered) and the mean
fraction of gold items kept, with the mean prompt context tokens.

    python bench/context_recall.py --finqa_dir ../shared/finqa_core

Writes bench/results/context_recall.json (or --output). CPU only, about a minute.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import write_result  # noqa: E402
from utils.contexts import evidence_kept, prompt_context, summarize_evidence, token_counter  # noqa: E402
from utils.finqa_data import entry_problem, load_raw_split, raw_files  # noqa: E402
from utils.models import load_tokenizer  # noqa: E402


def measure(entries: list, data: dict, tokenizer) -> dict:
    count_tokens = token_counter(tokenizer)
    contexts = [(entry, prompt_context(entry, data, tokenizer)) for entry in entries]
    summary = summarize_evidence([evidence_kept(entry, context) for entry, context in contexts])
    lengths = count_tokens([context.text for _, context in contexts])
    summary["mean_context_tokens"] = round(sum(lengths) / max(len(lengths), 1), 1)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finqa_dir", default="../shared/finqa_core")
    parser.add_argument("--model", default="models/smollm2-135m-instruct", help="tokenizer and chat template")
    parser.add_argument("--budgets", type=int, nargs="+", default=[640, 1024, 2048], help="data.max_prompt_tokens")
    parser.add_argument("--top_k", type=int, nargs="+", default=[3, 5, 10], help="data.retrieval_top_k")
    parser.add_argument("--output", default="bench/results/context_recall.json")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    raw_dir = Path(args.finqa_dir)
    settings = [("full", None)] + [("retrieved", k) for k in args.top_k]
    results = {}
    for split, file_name in raw_files(raw_dir).items():
        entries = [e for e in load_raw_split(raw_dir / file_name) if entry_problem(e, "full") is None]
        results[split] = {}
        for budget in args.budgets:
            for mode, k in settings:
                name = mode if k is None else f"{mode}_top{k}"
                data = {"context_mode": mode, "max_prompt_tokens": budget, "retrieval_top_k": k or 1}
                results[split][f"{name}@{budget}"] = measure(entries, data, tokenizer)
                print(split, name, budget, results[split][f"{name}@{budget}"], flush=True)
    write_result(args.output, {"finqa_dir": str(raw_dir), "tokenizer": args.model, "budgets": args.budgets,
                               "top_k": args.top_k, "splits": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
