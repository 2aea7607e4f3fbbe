"""Contexts (utils/contexts.py): what full and retrieved keep, the gold evidence they keep, and 01 on a raw folder
with FinQA's official test split."""
import json

import pytest

from conftest import synthetic_entry
from utils.contexts import (evidence_kept, full_context, gold_context, retrieved_context, summarize_evidence,
                            token_counter)
from utils.finqa_data import load_processed
from utils.models import load_tokenizer
from utils.runs import read_manifest


@pytest.fixture(scope="module")
def count(tiny_model_dir):
    return token_counter(load_tokenizer(tiny_model_dir))


def report_entry() -> dict:
    """A report with one sentence and one row that answer the question, among unrelated ones."""
    return {
        "id": "R/1", "pre_text": ["the company sells widgets worldwide .", "dividends were paid quarterly .", "."],
        "post_text": ["interest expense was 45 million in 2019 .", "headcount grew in asia ."],
        "table": [["", "2019", "2018"], ["office rent", "12", "11"], ["interest expense", "45", "40"],
                  ["travel", "3", "4"]],
        "qa": {"question": "what was the change in interest expense from 2018 to 2019?",
               "program": "subtract(45, 40)", "exe_ans": 5.0,
               "gold_inds": {"table_2": "the interest expense of 2019 is 45 ;", "text_3": "interest expense ..."}},
    }


def test_retrieved_keeps_the_questions_rows_and_the_header(count):
    entry = report_entry()
    context = retrieved_context(entry, count, budget=1000, top_k=2)
    assert context.kept == {"table_0", "table_2", "text_3"}  # text_3: post_text[0] (pre_text has 3 sentences)
    lines = context.text.splitlines()
    assert lines == ["Table:", " | 2019 | 2018", "interest expense | 45 | 40", "interest expense was 45 million in 2019 ."]
    assert evidence_kept(entry, context) == {"all_kept": True, "recall": 1.0}
    # a budget with room for the header and one line keeps the best-scored line only
    small = retrieved_context(entry, count, budget=sum(n + 1 for n in count(lines[:3])), top_k=2)
    assert len(small.kept) == 2 and evidence_kept(entry, small)["recall"] == 0.5


def test_full_context_records_what_the_budget_cut(count):
    entry = report_entry()
    whole = full_context(entry, count, budget=10_000)
    assert whole.kept == {"table_0", "table_1", "table_2", "table_3", "text_0", "text_1", "text_3", "text_4"}
    assert evidence_kept(entry, whole)["all_kept"]
    table_only = sum(n + 1 for n in count(whole.text.splitlines()[2:7]))  # "Table:" and the four rows
    cut = full_context(entry, count, budget=table_only)
    assert "text_3" not in cut.kept and evidence_kept(entry, cut) == {"all_kept": False, "recall": 0.5}
    assert gold_context(entry).kept == {"table_2", "text_3"}
    summary = summarize_evidence([evidence_kept(entry, whole), evidence_kept(entry, cut), None])
    assert summary == {"n_entries": 3, "n_with_gold": 2, "all_gold_kept": 0.5, "gold_item_recall": 0.75}


def test_official_test_split_is_built_in_full_and_retrieved_only(run_stage, finqa_dir, capsys):
    official = [synthetic_entry(100 + i) for i in range(4)]
    for entry in official[1:]:
        entry["qa"].pop("gold_inds")  # as in FinQA's test split: gold evidence on some entries only
        entry["qa"].pop("answer")
    (finqa_dir / "official_test.json").write_text(json.dumps(official))

    assert run_stage("00_check_data.py") == 0
    summary = json.loads((run_stage.stage_dir("00_data_validation") / "summary.json").read_text())
    assert summary["splits"]["official_test"]["n_valid"] == 4

    assert run_stage("01_prepare_dataset.py") == 0  # gold: train/val/test only, and the reason recorded
    manifest = read_manifest(run_stage.stage_dir("01_preprocessing"))
    assert "3 of 4 entries" in manifest["not_built"]["official_test"]
    assert not (run_stage.root / "processed" / "official_test.jsonl").exists()
    assert manifest["metrics"]["gold_evidence_kept"]["test"]["all_gold_kept"] == 1.0
    # asking 10 for it then is an error naming the way to build it
    capsys.readouterr()
    assert run_stage("10_evaluate.py", "--base", "--label", "base", "--split", "official_test") == 1
    assert "official_test.jsonl not found: 01_prepare_dataset.py builds it in the full or retrieved setting" in \
        capsys.readouterr().err

    for mode in ("full", "retrieved"):
        assert run_stage("01_prepare_dataset.py", "--run_id", f"run_{mode}", "--set", f"data.context_mode={mode}",
                         "--set", f"data.processed_dir={run_stage.root / mode}") == 0
        rows = load_processed(run_stage.root / mode / "official_test.jsonl")
        assert [row["id"] for row in rows] == [entry["id"] for entry in official]
        assert rows[1]["target_answer"] == str(official[1]["qa"]["exe_ans"])  # no qa.answer: exe_ans shown
        kept = read_manifest(run_stage.stage_dir("01_preprocessing", f"run_{mode}"))["metrics"]["gold_evidence_kept"]
        assert kept["official_test"]["n_entries"] == 4 and kept["official_test"]["n_with_gold"] == 1
