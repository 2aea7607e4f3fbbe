"""Benchmark: PPO's passes (utils/ppo.py) over one rollout with every row forwarded whole against the queries'
shared prefix forwarded once per forward (PolicyWithValue.forward), at 05's quick shape and at the study's.

The policy is built as 05 builds it: the SFT checkpoint merged into the frozen weights, a new LoRA adapter (here
with small random B, so that it is in the computation), the value head (small random weights). The rollout is
--rows train prompts (chat template) with their gold answers cut at random lengths up to --max_response tokens as
responses. Timed in one process, in the compute dtype (default: what model.dtype auto picks here), best of
--repeats, the two ways in turn:
  no_grad   the policy pass (log-probs and values) and the reference pass (adapter off) over the rollout, in
            chunks of mini_batch_size rows, as PPOTrainer.rollout runs them
  training  one PPO epoch: forward and backward of every micro-batch of a shuffled order (no optimizer step);
            micro-batches of fewer than 3 rows run whole rows either way (PPOTrainer._micro_batch_loss)
Agreement: the two ways' per-token log-probabilities of the response tokens (max and mean absolute difference),
beside the whole-row way in the compute dtype against float32 weights, the scale of rounding.

    python bench/bench_ppo_passes.py --policy_ckpt outputs/study_sft3/03_sft/ckpt_sft/best \
        --set data.processed_dir=datasets/finqa_core_processed

Writes bench/results/ppo_passes.json (or --output).
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402,F401  (first: sets the threading environment before torch loads)

import torch  # noqa: E402

from bench.machine import (abs_difference, best_in_turn, cut_gold_answer, policy_with_new_adapter,  # noqa: E402
                           stage_setup, write_result)
from utils import ppo  # noqa: E402
from utils.finqa_data import load_processed  # noqa: E402
from utils.generation import GenerationSettings  # noqa: E402
from utils.prompts import render_prompt  # noqa: E402

SHAPES = {"quick": {"rows": 4, "mini_batch_size": 2, "max_response": 48},  # 05 --quick_test
          "study": {"rows": 16, "mini_batch_size": 4, "max_response": 64}}  # configs/presets/cpu.yaml
WAYS = {"whole_rows": lambda queries, min_rows=2: 0, "shared_prefix": ppo.shared_prefix}


def rollout_tokens(tokenizer, rows: list[dict], max_response: int, seed: int):
    rng = random.Random(seed)
    queries = [tokenizer(render_prompt(tokenizer, row["prompt"]), add_special_tokens=False)["input_ids"]
               for row in rows]
    return queries, [cut_gold_answer(tokenizer, row, max_response, rng) for row in rows]


def build_trainer(config: dict, ckpt: str, dtype: torch.dtype, shape: dict, tokenizer, seed: int):
    policy = policy_with_new_adapter(config, ckpt, dtype, seed)
    settings = ppo.PPOSettings.from_config({**config["algorithm"], "rollout_batch_size": shape["rows"],
                                            "mini_batch_size": shape["mini_batch_size"]})
    generation = GenerationSettings(max_new_tokens=shape["max_response"], do_sample=True,
                                    temperature=config["generation"]["temperature"])
    trainer = ppo.PPOTrainer(policy, tokenizer, None, settings, generation, seed=seed, compute_dtype=dtype)
    torch.nn.init.normal_(trainer.unwrapped.value_head.linear.weight, std=1e-2)
    return trainer


def use(way: str) -> None:
    ppo.shared_prefix = WAYS[way]  # PPOTrainer's forwards look it up at call time


def measure(config: dict, args, compute, tokenizer, shape: dict) -> dict:
    rows = load_processed(Path(config["data"]["processed_dir"]) / "train.jsonl", limit=shape["rows"])
    queries, responses = rollout_tokens(tokenizer, rows, shape["max_response"], args.seed)
    trainer = build_trainer(config, args.policy_ckpt, compute.torch_dtype, shape, tokenizer, args.seed)
    mask = ppo.pad_batch(queries, responses, trainer.pad_id)[2].float()
    order = list(range(len(queries)))
    random.Random(args.seed).shuffle(order)
    micro = shape["mini_batch_size"]

    def no_grad():
        trainer._forward_no_grad(queries, responses, reference=False)
        trainer._forward_no_grad(queries, responses, reference=True)

    logprobs, values = trainer._forward_no_grad(queries, responses, reference=False)
    advantages = ppo.masked_whiten(torch.randn(mask.shape) * mask, mask)
    batch = ppo.Rollout(rows=rows, queries=queries, responses=responses, results=[], scores=torch.zeros(len(rows)),
                        mask=mask, logprobs=logprobs * mask, ref_logprobs=logprobs * mask, values=values * mask,
                        rewards=torch.zeros_like(mask), advantages=advantages, returns=values * mask)

    def training():
        trainer.unwrapped.train_mode()
        for start in range(0, len(order), micro):
            loss, _ = trainer._micro_batch_loss(batch, order[start: start + micro])
            loss.backward()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.unwrapped.eval()

    seconds = {}
    for part, function in (("no_grad", no_grad), ("training", training)):
        best = best_in_turn(lambda way: (use(way), function()), WAYS, args.repeats)
        seconds[part] = {way: round(value, 3) for way, value in best.items()}

    response = mask.bool()
    logps = {}
    for way in WAYS:
        use(way)
        logps[way] = trainer._forward_no_grad(queries, responses, reference=False)[0][response]
    use("shared_prefix")
    reference = build_trainer(config, args.policy_ckpt, torch.float32, shape, tokenizer, args.seed)
    reference.unwrapped.load_state_dict({k: v.float() for k, v in trainer.unwrapped.state_dict().items()})
    float32 = reference._forward_no_grad(queries, responses, reference=False)[0][response]

    return {
        "shape": {**shape, "query_tokens_mean": round(sum(map(len, queries)) / len(queries), 1),
                  "shared_prefix_tokens": ppo.shared_prefix(queries),
                  "response_tokens_mean": round(float(mask.sum(1).mean()), 1)},
        "seconds": seconds,
        "speedup": {part: round(by_way["whole_rows"] / by_way["shared_prefix"], 2) for part, by_way in seconds.items()},
        "logprob_difference": {"shared_prefix_vs_whole_rows": abs_difference(logps["shared_prefix"],
                                                                             logps["whole_rows"]),
                               "whole_rows_vs_float32": abs_difference(logps["whole_rows"], float32)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy_ckpt", required=True, help="the SFT checkpoint 05 starts from")
    parser.add_argument("--shapes", default="quick,study", help=f"some of {', '.join(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", default="bench/results/ppo_passes.json")
    args = parser.parse_args()

    config, compute, tokenizer = stage_setup("configs/algorithms/ppo.yaml", args.overrides)
    shapes = [name.strip() for name in args.shapes.split(",") if name.strip()]
    results = {name: measure(config, args, compute, tokenizer, SHAPES[name]) for name in shapes}
    write_result(args.output, {"benchmark": "ppo_passes", "policy_ckpt": args.policy_ckpt,
                               "precision": compute.record(), **results})


if __name__ == "__main__":
    main()
