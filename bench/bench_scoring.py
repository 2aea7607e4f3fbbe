"""Benchmark: how trl scores GRPO/RLOO completions, per completion (trl's own `_get_per_token_logps_and_entropies`)
against each distinct prompt once (utils.rl_trl.score_shared_prompts), at the study's shape.

The policy is built as 06/07 build it: the SFT checkpoint merged into the frozen weights, trl's fused LM head, a
new LoRA adapter (here with small random B, so that it is in the computation). The batch is what trl scores in
one step: --prompts train prompts (chat template) x --group completions each, the completions the prompt's gold
answer cut at random lengths up to --max_completion tokens (left-padded prompts, right-padded completions).
Timed in one process, in the compute dtype (default: what model.dtype auto picks here), best of --repeats, the two
ways in turn:
  no_grad   the whole batch without grad, in trl's chunks of --micro rows (the reference pass; RLOO's pass for
            its KL-in-reward as well)
  training  forward and backward of one micro-batch of --micro rows drawn from the shuffled batch, as trl's
            micro-batches are (trl shuffles a generation batch before splitting it)
Agreement: the two ways' per-token log-probabilities of the completion tokens (max and mean absolute difference),
beside trl's own path in the compute dtype against float32 weights, the scale of rounding.

    python bench/bench_scoring.py --policy_ckpt outputs/study_sft3/03_sft/ckpt_sft/best \
        --set data.processed_dir=datasets/finqa_core_processed

Writes bench/results/scoring.json (or --output).
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402,F401  (first: sets the threading environment before torch loads)

import torch  # noqa: E402

from bench.machine import (abs_difference, best_in_turn, cut_gold_answer, policy_with_new_adapter,  # noqa: E402
                           stage_setup, write_result)
from utils import rl_trl  # noqa: E402
from utils.finqa_data import load_processed  # noqa: E402
from utils.ppo import pad_batch  # noqa: E402
from utils.prompts import render_prompt  # noqa: E402


def scoring_batch(tokenizer, rows: list[dict], group: int, max_completion: int, seed: int):
    """trl's layout ([left-padded prompt | right-padded completion], utils.ppo.pad_batch) for group completions of
    each row. Returns input_ids, attention_mask, completion_mask."""
    rng = random.Random(seed)
    prompts, completions = [], []
    for row in rows:
        prompt = tokenizer(render_prompt(tokenizer, row["prompt"]), add_special_tokens=False)["input_ids"]
        prompts += [prompt] * group
        completions += [cut_gold_answer(tokenizer, row, max_completion, rng) for _ in range(group)]
    return pad_batch(prompts, completions, tokenizer.pad_token_id)


def build_policy(config: dict, ckpt: str, dtype: torch.dtype, temperature: float, seed: int):
    """As 06/07 build it, trl's fused LM head included."""
    from trl.trainer.utils import add_fused_lm_head

    return policy_with_new_adapter(config, ckpt, dtype, seed, lambda base: add_fused_lm_head(
        base, temperature=temperature, outputs=("log_probs", "entropy")))


def scorers(autocast) -> dict:
    """trl's own scoring and the shared-prompt one, as a trainer would hold them."""
    import trl

    trls = trl.GRPOTrainer._get_per_token_logps_and_entropies
    plain = SimpleNamespace(accelerator=SimpleNamespace(autocast=autocast, unwrap_model=lambda m: m,
                                                        is_main_process=True))
    plain._get_per_token_logps_and_entropies = lambda *args, **kwargs: trls(plain, *args, **kwargs)
    shared = SimpleNamespace(accelerator=plain.accelerator)
    shared._get_per_token_logps_and_entropies = plain._get_per_token_logps_and_entropies
    rl_trl.score_shared_prompts(shared)
    return {"trl": plain._get_per_token_logps_and_entropies, "shared": shared._get_per_token_logps_and_entropies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy_ckpt", required=True, help="the SFT checkpoint 06/07 start from")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (the study: 2)")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (the study: 8)")
    parser.add_argument("--micro", type=int, default=4, help="rows per micro-batch (the study: training.batch_size 4)")
    parser.add_argument("--max_completion", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", default="bench/results/scoring.json")
    args = parser.parse_args()

    config, compute, tokenizer = stage_setup("configs/algorithms/grpo.yaml", args.overrides)
    rows = load_processed(Path(config["data"]["processed_dir"]) / "train.jsonl", limit=args.prompts)
    ids, mask, completion = scoring_batch(tokenizer, rows, args.group, args.max_completion, args.seed)
    n, completion = completion.shape[1], completion.bool()
    temperature = config["generation"]["temperature"]
    policy = build_policy(config, args.policy_ckpt, compute.torch_dtype, temperature, args.seed)
    ways = scorers(compute.autocast)
    micro_rows = random.Random(args.seed).sample(range(len(ids)), args.micro)

    def no_grad(way):
        with torch.no_grad():
            return ways[way](policy, ids, mask, n, batch_size=args.micro)[0]

    def training(way):
        policy.zero_grad(set_to_none=True)
        logps, _, _ = ways[way](policy, ids[micro_rows], mask[micro_rows], n, compute_entropy=True)
        (logps * completion[micro_rows]).sum().backward()

    seconds = {}
    for part, function, mode in (("no_grad", no_grad, policy.eval), ("training", training, policy.train)):
        mode()
        seconds[part] = best_in_turn(function, ways, args.repeats)
    policy.eval()

    logps = {way: no_grad(way)[completion].float() for way in ways}
    reference = build_policy(config, args.policy_ckpt, torch.float32, temperature, args.seed)
    reference.load_state_dict({k: v.float() for k, v in policy.state_dict().items()})
    with torch.no_grad():
        float32 = scorers(lambda: torch.autocast("cpu", enabled=False))["trl"](
            reference.eval(), ids, mask, n, batch_size=args.micro)[0][completion]

    result = {
        "benchmark": "scoring",
        "policy_ckpt": args.policy_ckpt,
        "precision": compute.record(),
        "batch": {"prompts": args.prompts, "group": args.group, "rows": len(ids), "micro": args.micro,
                  "prompt_tokens_mean": round(float(mask[:, :-n].sum(1).float().mean()), 1),
                  "completion_tokens_mean": round(float(completion.sum(1).float().mean()), 1)},
        "seconds": {part: {way: round(value, 3) for way, value in by_way.items()} for part, by_way in seconds.items()},
        "speedup": {part: round(by_way["trl"] / by_way["shared"], 2) for part, by_way in seconds.items()},
        "logprob_difference": {"shared_vs_trl": abs_difference(logps["shared"], logps["trl"]),
                               "trl_vs_float32": abs_difference(logps["trl"], float32)},
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
