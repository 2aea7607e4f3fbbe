"""Stage 08: preference pairs (prompt, chosen, rejected) from 04's scored candidates, for DPO (09_train_dpo.py).

Reads candidates.jsonl and scores.jsonl of this run's 04_candidates (or --candidates_dir) and pairs candidates of
each prompt by the rules under `preferences:` in configs/algorithms/dpo.yaml (utils/preferences.py): tiers
correct > numeric > valid program > valid JSON > invalid JSON, reward(chosen) >= reward(rejected) + min_margin
(checked for every pair), a cap per prompt, identical texts once, and optionally the gold answer as a candidate
when none is correct. Writes pairs.jsonl (training pairs) and heldout_pairs.jsonl (the pairs of a seeded share of
prompts, held out for 09's preference accuracy), both in trl's conversational preference format (prompt messages,
chosen / rejected as assistant message lists) with chosen_reward, rejected_reward and margin; stats.txt;
plots/margin_histogram.png; and the counts, the reasons prompts have no pair and the margin histogram in the
manifest.
"""
from pathlib import Path

import utils  # noqa: F401  (first: sets the threading environment before torch loads)
from utils.cli import ConfigFlag, main_guard, resolve_config, setup_logging, stage_dir, stage_parser, upstream_dir
from utils.finqa_data import load_processed, write_jsonl
from utils.preferences import (NO_PAIR_REASONS, PairingRules, PreferenceError, build_pairs, format_stats,
                               make_candidate, margin_histogram, plot_margin_histogram, read_candidates, read_scores,
                               split_heldout)
from utils.prompts import answer_json
from utils.runs import StageError, require_completed, stage_run, write_text_atomic
from utils.stage_inputs import processed_split, reward_calculator, reward_spec_path
from utils.stages import STAGES

STAGE = STAGES["preferences"]


def yes_no(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got '{text}'")


FLAGS = (
    ConfigFlag("--min_margin", "algorithm.preferences.min_margin", float,
               "every pair: reward(chosen) >= reward(rejected) + this"),
    ConfigFlag("--max_pairs_per_prompt", "algorithm.preferences.max_pairs_per_prompt", int,
               "cap on pairs per prompt (0 = no cap)"),
    ConfigFlag("--heldout_fraction", "algorithm.preferences.heldout_fraction", float,
               "share of prompts held out for 09's preference accuracy"),
    ConfigFlag("--add_gold_when_no_correct", "algorithm.preferences.add_gold_when_no_correct", yes_no,
               "true/false: add the gold answer as a candidate when no candidate is correct"),
)


def candidates_input(args, config) -> tuple[Path, dict]:
    """--candidates_dir or this run's 04_candidates, which must be a completed stage; and its manifest."""
    folder = Path(args.candidates_dir) if args.candidates_dir else upstream_dir(args, config, "candidates")
    return folder, require_completed(folder, "run 04_generate_candidates.py first, or pass --candidates_dir")


def reward_spec_for(args, config, candidates_manifest: dict) -> Path | None:
    """--reward_spec, else the spec 04 scored the candidates with (gold answers must be scored the same way),
    else this run's 02_rewards (or the default weights)."""
    if not args.reward_spec:
        used = candidates_manifest.get("inputs", {}).get("reward_spec", {}).get("path")
        if used and Path(used).is_file():
            return Path(used)
    return reward_spec_path(args, config)


def main() -> int:
    parser = stage_parser(__doc__, STAGE, config_flags=FLAGS)
    parser.add_argument("--candidates_dir", default=None,
                        help="a completed 04_candidates folder (default: this run's)")
    parser.add_argument("--reward_spec", default=None, help="reward weights for scoring gold answers (default: "
                                                            "the spec 04 used, else this run's 02_rewards)")
    args = parser.parse_args()
    config = resolve_config(args)
    rules = PairingRules.from_config(config["algorithm"]["preferences"])
    out_dir = stage_dir(args, config, STAGE.key)
    log = setup_logging()

    with stage_run(STAGE.manifest_name, out_dir, config, args.seed, overwrite=args.overwrite,
                   keep_partial=False) as run:
        source, candidates_manifest = candidates_input(args, config)
        candidates_rows = read_candidates(run.add_input("candidates", source / "candidates.jsonl"))
        scores = read_scores(run.add_input("scores", source / "scores.jsonl"))
        if not candidates_rows:
            raise StageError(f"{source / 'candidates.jsonl'}: no prompts")

        gold_for = None
        if rules.add_gold_when_no_correct:
            split = candidates_manifest.get("config", {}).get("candidates", {}).get("split", "train")
            gold_rows = {row["id"]: row for row in load_processed(run.add_input(split, processed_split(config, split)))}
            spec = reward_spec_for(args, config, candidates_manifest)
            if spec:
                run.add_input("reward_spec", spec)
            calculator = reward_calculator(spec)

            def gold_for(prompt_id: str):
                row = gold_rows.get(prompt_id)
                if row is None:
                    raise PreferenceError(f"{prompt_id}: not in processed {split}.jsonl (the gold answer is needed "
                                          f"because no candidate is correct)")
                text = answer_json(row["target_program"], row["target_answer"])
                return make_candidate(text, calculator.score_example(text, row).to_dict(), rules, None, "gold")

        pairs, report = build_pairs(candidates_rows, scores, rules, gold_for)
        train, heldout = split_heldout(pairs, rules.heldout_fraction, args.seed)
        write_jsonl(run.add_output("pairs", out_dir / "pairs.jsonl"), train)
        write_jsonl(run.add_output("heldout_pairs", out_dir / "heldout_pairs.jsonl"), heldout)

        margins = [pair["margin"] for pair in pairs]
        histogram = margin_histogram(margins, rules.histogram_bin_width, start=rules.min_margin)
        train_prompts, heldout_prompts = len({p["id"] for p in train}), len({p["id"] for p in heldout})
        stats = format_stats(report, rules, len(train), len(heldout), train_prompts, heldout_prompts, histogram,
                             str(source))
        write_text_atomic(run.add_output("stats", out_dir / "stats.txt"), stats)
        plot_margin_histogram(histogram, run.add_output("margin_histogram", out_dir / "plots" / "margin_histogram.png"),
                              f"preference pair margins ({len(pairs)} pairs, min_margin {rules.min_margin})")

        run.extra["preferences"] = {"rules": vars(rules) | {"tiers": list(rules.tiers)},
                                    "no_pair_reason_meanings": NO_PAIR_REASONS,
                                    "split": "pairs.jsonl = train, heldout_pairs.jsonl = held-out prompts"}
        run.metrics.update({
            **report.to_dict(),
            "add_gold_when_no_correct": rules.add_gold_when_no_correct,
            "n_train_pairs": len(train), "n_heldout_pairs": len(heldout),
            "n_train_prompts": train_prompts, "n_heldout_prompts": heldout_prompts,
            "margin_histogram": histogram,
            "margin_mean": round(sum(margins) / len(margins), 5) if margins else None,
            "margin_min": min(margins, default=None), "margin_max": max(margins, default=None),
        })
        print(stats, end="")
        if not pairs:
            log.warning("no preference pairs: %s", dict(report.no_pair_reasons))
        log.info("preference pairs: %d train, %d held out, from %d of %d prompts", len(train), len(heldout),
                 report.n_prompts_with_pairs, report.n_prompts)
    return 0


if __name__ == "__main__":
    main_guard(main)
