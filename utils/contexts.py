"""The context a prompt shows for a raw FinQA entry, and how much of the gold evidence it keeps.

Three settings (data.context_mode):
- gold: FinQA's annotated evidence (qa.gold_inds), the setting of FinQA's program-generator results;
- full: the whole report, table first, then sentences in order until data.max_prompt_tokens is spent;
- retrieved: the question's data.retrieval_top_k best sentences and table rows by BM25 (bm25s, over the entry's
  own report: no model, no download), the table header always kept, cut to the same budget.

Evidence items use FinQA's own keys: text_i is the i-th sentence of pre_text + post_text, table_i the i-th table
row. A full or retrieved context records the keys it kept, so `evidence_kept` can say whether the gold evidence
survived (an entry whose needed row was cut cannot be answered, whatever the model).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import bm25s

from utils.finqa_data import build_example
from utils.prompts import render_prompt

logging.getLogger("bm25s").setLevel(logging.WARNING)

CountTokens = Callable[[list[str]], list[int]]  # token counts of lines, one batched tokenizer call


@dataclass
class Context:
    text: str
    kept: set[str] = field(default_factory=set)  # the evidence keys (text_i, table_i) the text holds


def table_row_text(row: list[str]) -> str:
    return " | ".join(cell.strip() for cell in row)


def sentences(entry: dict) -> list[tuple[str, str, str]]:
    """(key, source, sentence) for every sentence worth showing, in the report's order."""
    items, index = [], 0
    for source in ("pre_text", "post_text"):
        for sentence in entry[source]:
            if sentence.strip() and sentence.strip() != ".":
                items.append((f"text_{index}", source, sentence.strip()))
            index += 1
    return items


def gold_context(entry: dict) -> Context:
    """FinQA's gold evidence (gold_inds): the annotated sentences and linearised table rows."""
    gold = entry["qa"]["gold_inds"]
    return Context("\n".join(text.strip() for text in gold.values()), set(gold))


def _render(entry: dict, report: list[tuple[str, str, str]], text_keys: set[str],
            row_indices: list[int] | None) -> str:
    """The kept sentences of `report` (sentences(entry)) around the kept table rows (None: no table part), all
    in the report's order."""
    kept = {"pre_text": [], "post_text": []}
    for key, source, sentence in report:
        if key in text_keys:
            kept[source].append(sentence)
    table_lines = [] if row_indices is None else \
        ["Table:"] + [table_row_text(entry["table"][i]) for i in sorted(row_indices)]
    return "\n".join(kept["pre_text"] + table_lines + kept["post_text"])


def full_context(entry: dict, count_tokens: CountTokens, budget: int) -> Context:
    """All text and the table, in the report's order, cut to a token budget.

    The table is kept first (table ops need its row names), then sentences in their order until the budget is
    spent. A table that alone exceeds the budget keeps its rows from the top while they fit (at least one), and
    no text. Linear in the size of the report.
    """
    table_lines = ["Table:"] + [table_row_text(row) for row in entry["table"]]
    items = sentences(entry)
    costs = [n + 1 for n in count_tokens(table_lines + [sentence for _, _, sentence in items])]
    table_costs, sentence_costs = costs[:len(table_lines)], costs[len(table_lines):]
    used = sum(table_costs)
    if used > budget:
        kept_lines, used = 0, 0
        for cost in table_costs:
            if kept_lines and used + cost > budget:
                break
            kept_lines, used = kept_lines + 1, used + cost
        rows = list(range(kept_lines - 1))
        return Context("\n".join(table_lines[:kept_lines]), {f"table_{i}" for i in rows})
    text_keys = set()
    for (key, _, _), cost in zip(items, sentence_costs):
        if used + cost <= budget:
            text_keys.add(key)
            used += cost
    rows = list(range(len(entry["table"])))
    return Context(_render(entry, items, text_keys, rows), text_keys | {f"table_{i}" for i in rows})


def _search_tokens(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def retrieved_context(entry: dict, count_tokens: CountTokens, budget: int, top_k: int) -> Context:
    """The question's top_k sentences and table rows by BM25 over this report, the header row always kept.

    A table row is searched with the header's words added (a question names the year of a column), and shown
    as the row itself. Items are taken best first while they fit in the budget; ties keep the report's order.
    """
    table, report = entry["table"], sentences(entry)
    shown = {key: text for key, _, text in report}
    shown.update({f"table_{i}": table_row_text(row) for i, row in enumerate(table)})
    header = shown.get("table_0", "")
    items = [(key, sentence) for key, _, sentence in report]
    items += [(f"table_{i}", f"{shown[f'table_{i}']} {header}") for i in range(1, len(table))]
    header_keys = ["table_0"] if table else []
    if not items:
        return Context(_render(entry, report, set(), [0] if table else None), set(header_keys))
    retriever = bm25s.BM25()
    retriever.index(_search_tokens([text for _, text in items]), show_progress=False)
    scores = retriever.get_scores(_search_tokens([entry["qa"]["question"]])[0])
    ranked = sorted(range(len(items)), key=lambda i: (-float(scores[i]), i))[:top_k]

    heading = ["Table:"] + [shown[key] for key in header_keys] if table else []
    costs = [n + 1 for n in count_tokens(heading + [shown[items[i][0]] for i in ranked])]
    used = sum(costs[:len(heading)])  # the "Table:" line and the header are always shown
    kept = set(header_keys)
    for i, cost in zip(ranked, costs[len(heading):]):
        key = items[i][0]
        if used + cost <= budget:
            kept.add(key)
            used += cost
    rows = sorted(int(key.split("_")[1]) for key in kept if key.startswith("table_"))
    return Context(_render(entry, report, {k for k in kept if k.startswith("text_")}, rows if table else None),
                   kept)


def build_context(entry: dict, mode: str, count_tokens: CountTokens, budget: int, top_k: int) -> Context:
    if mode == "gold":
        return gold_context(entry)
    if mode == "full":
        return full_context(entry, count_tokens, budget)
    if mode == "retrieved":
        return retrieved_context(entry, count_tokens, budget, top_k)
    raise ValueError(f"unknown context mode {mode!r}")


def token_counter(tokenizer) -> CountTokens:
    def count_tokens(lines: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]] if lines else []

    return count_tokens


def prompt_context(entry: dict, data: dict, tokenizer) -> Context:
    """The context 01 puts in an entry's prompt under the config's data section (context_mode,
    max_prompt_tokens, retrieval_top_k). The budget is for the whole prompt: the instructions and the
    question are counted first."""
    count_tokens = token_counter(tokenizer)
    overhead = 0
    if data["context_mode"] != "gold":
        overhead = count_tokens([render_prompt(tokenizer, build_example(entry, "", data["context_mode"])["prompt"])])[0]
    return build_context(entry, data["context_mode"], count_tokens, max(data["max_prompt_tokens"] - overhead, 0),
                         data["retrieval_top_k"])


def evidence_kept(entry: dict, context: Context) -> dict | None:
    """How much of the entry's gold evidence the context holds (None when the entry has no gold_inds)."""
    gold = entry["qa"].get("gold_inds")
    if not isinstance(gold, dict) or not gold:
        return None
    kept = len(set(gold) & context.kept)
    return {"all_kept": kept == len(gold), "recall": kept / len(gold)}


def summarize_evidence(records: list[dict | None]) -> dict:
    """Over a split: entries with gold evidence, the fraction whose evidence all survived, mean item recall."""
    known = [record for record in records if record is not None]
    n = len(known)
    return {"n_entries": len(records), "n_with_gold": n,
            "all_gold_kept": round(sum(r["all_kept"] for r in known) / n, 4) if n else None,
            "gold_item_recall": round(sum(r["recall"] for r in known) / n, 4) if n else None}
