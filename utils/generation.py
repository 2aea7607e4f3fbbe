"""Batched generation shared by SFT validation, candidate generation, evaluation and the RL stages.

Prompts are rendered with the model's chat template, sorted by length so each batch pads little, left-padded
(decoder-only models continue from the right edge) and decoded with the KV cache. Each sequence stops at the
end of its JSON object or at end-of-turn, whichever comes first. inf/nan logits are replaced before sampling
(remove_invalid_values), so a numerically unstable checkpoint degrades instead of crashing the sampler.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from utils.prompts import render_prompt


@dataclass
class GenerationSettings:
    max_new_tokens: int = 96
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1
    stop_at_json_end: bool = True


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of JSON or end-of-turn) or "length"

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class GenerationStats:
    n_prompts: int = 0
    n_sequences: int = 0
    n_generated_tokens: int = 0
    n_padded_prompt_tokens: int = 0
    seconds: float = 0.0
    per_batch: list = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.n_generated_tokens / self.seconds if self.seconds else 0.0


def json_object_end(text: str) -> int:
    """Index just past the first complete JSON object in text (braces inside strings ignored), or -1."""
    start = text.find("{")
    if start < 0:
        return -1
    depth, in_string, escaped = 0, False, False
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index + 1
    return -1


class JsonEndCriteria(StoppingCriteria):
    """Stops each row once its generated text holds a complete JSON object."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([json_object_end(text) >= 0 for text in texts], device=input_ids.device)


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def _trim(ids: list[int], stops: set[int], pad_id: int | None) -> tuple[list[int], bool]:
    """Generated ids up to and including the first stop token; whether a stop token ended them."""
    for index, token_id in enumerate(ids):
        if token_id in stops:
            return ids[: index + 1], True
    if pad_id is not None:
        while ids and ids[-1] == pad_id:
            ids = ids[:-1]
    return ids, False


@torch.no_grad()
def generate(model, tokenizer, prompts: list, settings: GenerationSettings, desc: str = "generating",
             seed: int | None = None, stats: GenerationStats | None = None,
             show_progress: bool = True) -> list[list[Generation]]:
    """num_return_sequences generations per prompt, in the prompts' order.

    prompts: chat messages (rendered with the tokenizer's chat template) or already rendered strings.
    """
    texts = [p if isinstance(p, str) else render_prompt(tokenizer, p) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    results: list[list[Generation] | None] = [None] * len(texts)
    stops = set(stop_token_ids(tokenizer))
    device = next(model.parameters()).device
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    saved_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    stats = stats if stats is not None else GenerationStats()
    try:
        batches = [order[i: i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
        bar = tqdm(batches, desc=desc, unit="batch", disable=not show_progress)
        for batch in bar:
            started = time.time()
            inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(device)
            prompt_length = inputs["input_ids"].shape[1]
            criteria = StoppingCriteriaList([JsonEndCriteria(tokenizer, prompt_length)]
                                            if settings.stop_at_json_end else [])
            sampling = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                            top_k=0) if settings.do_sample else dict(do_sample=False, temperature=None,
                                                                     top_p=None, top_k=None)
            output = model.generate(**inputs, max_new_tokens=settings.max_new_tokens,
                                    num_return_sequences=settings.num_return_sequences,
                                    eos_token_id=sorted(stops), pad_token_id=tokenizer.pad_token_id,
                                    stopping_criteria=criteria, remove_invalid_values=True, use_cache=True,
                                    **sampling)
            generated = output[:, prompt_length:].tolist()
            n_tokens = 0
            for row_index, prompt_index in enumerate(batch):
                group = []
                for k in range(settings.num_return_sequences):
                    ids, stopped = _trim(generated[row_index * settings.num_return_sequences + k], stops,
                                         tokenizer.pad_token_id)
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    end = json_object_end(text)
                    finished = stopped or end >= 0
                    group.append(Generation(text=text.strip(), token_ids=ids,
                                            finish_reason="stop" if finished else "length"))
                    n_tokens += len(ids)
                results[prompt_index] = group
            seconds = time.time() - started
            stats.n_prompts += len(batch)
            stats.n_sequences += len(batch) * settings.num_return_sequences
            stats.n_generated_tokens += n_tokens
            stats.n_padded_prompt_tokens += int(inputs["input_ids"].numel())
            stats.seconds += seconds
            stats.per_batch.append({"size": len(batch), "prompt_length": prompt_length, "tokens": n_tokens,
                                    "seconds": round(seconds, 3)})
            bar.set_postfix(tok_s=f"{stats.tokens_per_second:.0f}")
    finally:
        tokenizer.padding_side = saved_side
        if was_training:
            model.train()
    return results  # type: ignore[return-value]


def settings_from_config(config: dict, sampled: bool, **overrides) -> GenerationSettings:
    gen = config["generation"]
    settings = GenerationSettings(max_new_tokens=gen["max_new_tokens"], batch_size=gen["batch_size"],
                                  do_sample=sampled, temperature=gen["temperature"] if sampled else 1.0,
                                  top_p=gen["top_p"] if sampled else 1.0)
    for key, value in overrides.items():
        if value is not None:
            setattr(settings, key, value)
    return settings
