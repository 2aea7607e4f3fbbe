"""Benchmark: does bf16 change the results? One checkpoint evaluated twice by 10, item by item.

Reads two 10_evaluation/<label> folders that evaluated the same checkpoint on the same items (one with
`--set model.dtype=float32`, one with bfloat16) and reports how often greedy decoding wrote the same program,
how often the execution verdict is the same, and the exact McNemar p of the accuracy difference. Also compares
two SFT stages' loss curves (fp32 and bf16 runs of 03 on the same data and seed) step by step, and their
validation figures.

    python 10_evaluate.py --run_id sample_fp32 --label sft_in_bf16 --policy_ckpt outputs/sample_fp32/03_sft/ckpt_sft/best
    python bench/bench_precision.py --eval_a outputs/sample_fp32/10_evaluation/sft \\
        --eval_b outputs/sample_fp32/10_evaluation/sft_in_bf16 \\
        --sft_a outputs/sample_fp32/03_sft --sft_b outputs/sample_bf16/03_sft

Writes bench/results/precision.json (or --output).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from bench.machine import write_result  # noqa: E402
from utils.stats import mcnemar_exact  # noqa: E402


def evaluation_agreement(folder_a: Path, folder_b: Path) -> dict:
    a = pd.read_csv(folder_a / "breakdown.csv").set_index("id")
    b = pd.read_csv(folder_b / "breakdown.csv").set_index("id")
    if set(a.index) != set(b.index):
        raise SystemExit(f"error: {folder_a} and {folder_b} evaluated different items")
    b = b.loc[a.index]
    test = mcnemar_exact(a.exec_match.to_numpy(), b.exec_match.to_numpy())
    return {"a": str(folder_a), "b": str(folder_b), "n_items": len(a),
            "same_completion": round(float((a.prediction.fillna("") == b.prediction.fillna("")).mean()), 3),
            "same_program": round(float((a.program.fillna("") == b.program.fillna("")).mean()), 3),
            "same_execution_verdict": round(float((a.exec_match == b.exec_match).mean()), 3),
            "execution_accuracy_a": round(float(a.exec_match.mean()), 3),
            "execution_accuracy_b": round(float(b.exec_match.mean()), 3),
            "right_only_in_a": test["c"], "right_only_in_b": test["b"], "mcnemar_p": round(test["p_value"], 4)}


def sft_curves(folder_a: Path, folder_b: Path) -> dict:
    def read(folder: Path) -> tuple[dict, dict]:
        log = json.loads((folder / "logs" / "training_log.json").read_text())
        history = log if isinstance(log, list) else log.get("log_history", log.get("history", []))
        losses = {r["step"]: r["loss"] for r in history if "loss" in r}
        manifest = json.loads((folder / "manifest.json").read_text())
        return losses, manifest
    losses_a, manifest_a = read(folder_a)
    losses_b, manifest_b = read(folder_b)
    steps = sorted(set(losses_a) & set(losses_b))
    gaps = [abs(losses_a[s] - losses_b[s]) for s in steps]
    return {"a": str(folder_a), "b": str(folder_b),
            "dtype_a": manifest_a["precision"]["dtype"], "dtype_b": manifest_b["precision"]["dtype"],
            "loss_a": [round(losses_a[s], 4) for s in steps], "loss_b": [round(losses_b[s], 4) for s in steps],
            "steps": steps, "max_abs_loss_gap": round(max(gaps), 4) if gaps else None,
            "mean_abs_loss_gap": round(sum(gaps) / len(gaps), 4) if gaps else None,
            "train_runtime_s_a": manifest_a["metrics"].get("train_runtime_s"),
            "train_runtime_s_b": manifest_b["metrics"].get("train_runtime_s"),
            "validation_a": manifest_a["metrics"].get("validation"),
            "validation_b": manifest_b["metrics"].get("validation")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval_a", type=Path, required=True, help="10_evaluation/<label> folder (float32)")
    parser.add_argument("--eval_b", type=Path, required=True, help="the same checkpoint evaluated in bf16")
    parser.add_argument("--sft_a", type=Path, help="03_sft folder of a float32 run")
    parser.add_argument("--sft_b", type=Path, help="03_sft folder of a bf16 run on the same data and seed")
    parser.add_argument("--output", default="bench/results/precision.json")
    args = parser.parse_args()
    result = {"benchmark": "precision", "greedy_evaluation": evaluation_agreement(args.eval_a, args.eval_b)}
    if args.sft_a and args.sft_b:
        result["sft"] = sft_curves(args.sft_a, args.sft_b)
    write_result(args.output, result)


if __name__ == "__main__":
    main()
