"""Stage 04: sample K candidate answers per prompt from a policy and score each with the reward calculator.

Writes candidates.jsonl (one line per prompt: id, prompt, K completions) and scores.jsonl (one line per
candidate: id, index, reward and its components), with the parse rate and the reward distribution in the
manifest. 08_build_prefs.py turns them into preference pairs. The policy defaults to this run's SFT best.
"""
from collections import Counter

import numpy as np

from utils import processes, vllm_engine
from utils.cli import ConfigFlag, main_guard, resolve_config, setup_logging, stage_dir, stage_parser
from utils.finqa_data import load_processed, write_jsonl
from utils.generation import GenerationStats, generate, settings_from_config
from utils.compute import precision
from utils.models import configure_torch, load_model, load_tokenizer
from utils.runs import stage_run
from utils.stage_inputs import processed_split, reward_calculator, reward_spec_path, sft_checkpoint
from utils.stages import STAGES

STAGE = STAGES["candidates"]

FLAGS = (
    ConfigFlag("--num_candidates", "candidates.num_candidates", int, "candidates sampled per prompt (K)"),
    ConfigFlag("--temperature", "generation.temperature", float, "sampling temperature"),
    ConfigFlag("--top_p", "generation.top_p", float, "nucleus sampling"),
    ConfigFlag("--split", "candidates.split", str, "processed split to sample on"),
    ConfigFlag("--max_prompts", "candidates.max_prompts", int, "use the first N prompts of the split"),
)


def main() -> int:
    parser = stage_parser(__doc__, STAGE, config_flags=FLAGS)
    parser.add_argument("--policy_ckpt", default=None, help="policy to sample from (default: this run's "
                                                            "03_sft/ckpt_sft/best)")
    parser.add_argument("--reward_spec", default=None, help="reward weights (default: this run's 02_rewards)")
    args = parser.parse_args()
    config = resolve_config(args)
    settings = config["candidates"]
    log = setup_logging()
    device = configure_torch(config)

    with stage_run(STAGE.manifest_name, stage_dir(args, config, STAGE.key), config, args.seed,
                   overwrite=args.overwrite, keep_partial=False) as run:
        rows = load_processed(run.add_input(settings["split"], processed_split(config, settings["split"])),
                              settings["max_prompts"])
        ckpt = run.add_input("policy", sft_checkpoint(args, config))
        spec = reward_spec_path(args, config)
        if spec:
            run.add_input("reward_spec", spec)
        calculator = reward_calculator(spec)
        compute = precision(config, device)
        run.extra["precision"] = compute.record()
        k = settings["num_candidates"]
        prompts = [row["prompt"] for row in rows]
        sampling = settings_from_config(config, sampled=True, num_return_sequences=k)
        if config["generation"]["engine"] == "vllm":  # the checkpoint's weights served by vLLM
            stats = vllm_engine.EngineStats()
            generations = vllm_engine.generate_with_vllm(config, ckpt, run.dir / ".vllm_weights", device,
                                                         compute.inference_dtype, prompts, sampling, args.seed, stats)
            generation_record = vllm_engine.engine_record(stats, len(rows))
        else:
            tokenizer = load_tokenizer(config["model"]["path"])
            model = load_model(config["model"]["path"], ckpt, device, compute.inference_dtype)
            stats = GenerationStats()
            # several processes (utils.processes): each samples its share of the batches, the main one writes
            generations = processes.gather_in_order(generate(
                model, tokenizer, prompts, sampling, desc=f"sampling {k} per prompt", seed=args.seed, stats=stats,
                shard=processes.shard()))
            if not processes.is_main():
                return 0
            generation_record = {"engine": "native", "seconds": round(stats.seconds, 2),
                                 "tokens": stats.n_generated_tokens,
                                 "tokens_per_second": round(stats.tokens_per_second, 2)}  # the main process's share

        candidates, scores = [], []
        for row, group in zip(rows, generations):
            candidates.append({"id": row["id"], "prompt": row["prompt"],
                               "candidates": [g.text for g in group]})
            for index, generation in enumerate(group):
                result = calculator.score_example(generation.text, row)
                scores.append({"id": row["id"], "index": index, "n_tokens": generation.n_tokens,
                               "finish_reason": generation.finish_reason, **result.to_dict()})
        write_jsonl(run.add_output("candidates", run.dir / "candidates.jsonl"), candidates)
        write_jsonl(run.add_output("scores", run.dir / "scores.jsonl"), scores)

        rewards = np.array([s["total"] for s in scores])
        per_prompt_best = [max(s["total"] for s in scores if s["id"] == row["id"]) for row in rows]
        run.metrics.update({
            "n_prompts": len(rows), "num_candidates": k, "n_candidates": len(scores),
            "parse_rate": round(float(np.mean([s["format_ok"] for s in scores])), 5),
            "program_validity": round(float(np.mean([s["program_valid"] for s in scores])), 5),
            "execution_accuracy": round(float(np.mean([s["exec_match"] for s in scores])), 5),
            "reward_mean": round(float(rewards.mean()), 5), "reward_std": round(float(rewards.std()), 5),
            "reward_histogram": dict(sorted(Counter(round(float(r), 2) for r in rewards).items())),
            "prompts_with_a_correct_candidate": sum(any(s["exec_match"] for s in scores if s["id"] == row["id"])
                                                    for row in rows),
            "mean_best_reward_per_prompt": round(float(np.mean(per_prompt_best)), 5),
            "generation": generation_record,
            "processes": processes.world_size(),  # each process samples its own stream
        })
        log.info("candidates: %d prompts x %d, parse rate %.2f, mean reward %.3f", len(rows), k,
                 run.metrics["parse_rate"], run.metrics["reward_mean"])
    return 0


if __name__ == "__main__":
    main_guard(main)
