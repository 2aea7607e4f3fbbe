"""Batched generation shared by SFT validation, candidate generation, evaluation and PPO's rollouts.

Where the time goes on a small CPU decides the design (bench/bench_generation.py measures it): the prompt
forward pass (prefill) is compute-bound, so batching does not make it cheaper, only smaller; the per-token
decode step is overhead- and bandwidth-bound, so batching makes it ~10x cheaper per row. Hence:

- Every FinQA prompt starts with the same system/instruction text. That shared prefix is run once per call and
  its KV cache is reused by every prompt, so each prompt's prefill covers only its own question and context.
- Prompts are sorted by length; a decode batch is prefilled in chunks of similar length (little padding), and
  each prompt is prefilled once however many sequences it returns (the cache is repeated for sampling).
- The prefill chunks write into a KV cache preallocated for the whole answer, and the decode loop writes each
  step's tokens into it in place (no copy of the cache per step or per chunk). The loop runs all rows of the
  batch and drops rows as they finish, so a long answer does not make the short ones pay for its steps. A row
  stops at end-of-turn / EOS or at the end of its first complete JSON object, whichever comes first.
- Greedy decoding also feeds, per row and step, a few tokens guessed by prompt lookup (answers copy numbers and
  names from the prompt) and keeps those the model itself would have chosen: fewer, fuller decode steps.
- inf/nan logits are replaced before choosing a token (transformers' InfNanRemoveLogitsProcessor), so a
  numerically unstable checkpoint degrades instead of crashing the sampler.

The shared prefix and chunked prefill use padding in the middle of a row ([prefix][pad][suffix]) with explicit
position ids, so every real token has the position it would have alone; greedy output matches a plain
one-prompt-at-a-time `model.generate` (tests/test_generation.py).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (InfNanRemoveLogitsProcessor, LogitsProcessorList, StoppingCriteria,
                          TemperatureLogitsWarper, TopPLogitsWarper)
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from utils.compute import precision
from utils.models import last_positions, prefix_cache
from utils.prompts import render_prompt


@dataclass
class GenerationSettings:
    max_new_tokens: int = 96
    batch_size: int = 16          # sequences decoded together (prompts per batch = batch_size // num_return_sequences)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1
    stop_at_json_end: bool = True
    lookup_draft_tokens: int = 0  # greedy only: tokens guessed per step by prompt lookup and verified in one pass
    compute_dtype: str = "float32"  # a float32 model runs under autocast to this (utils.compute)


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
    n_prefill_tokens: int = 0     # prompt tokens run through the model, padding included (shared prefix once)
    n_prompt_tokens: int = 0      # the prompts' own tokens, for comparison
    n_decode_steps: int = 0       # forward passes of the decode loop (all rows of a batch advance together)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
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


def _closing_brace_tokens(tokenizer) -> set[int]:
    """Ids of the tokens whose text holds a "}": only such a token can complete a JSON object."""
    cached = getattr(tokenizer, "_finqa_closing_brace_tokens", None)
    if cached is None:
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        cached = {i for i, token in enumerate(tokens) if token is not None and "}" in token}
        tokenizer._finqa_closing_brace_tokens = cached
    return cached


def shared_prefix_length(encoded: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token of its own."""
    if not encoded:
        return 0
    limit = min(len(ids) for ids in encoded) - 1
    first = encoded[0]
    length = 0
    while length < limit and all(ids[length] == first[length] for ids in encoded):
        length += 1
    return length


def prefill_chunks(lengths: list[int], max_padding: float = 0.2) -> list[list[int]]:
    """Split a batch (sorted longest first) where a row would be padded by more than max_padding of the chunk's
    longest row: prefill is compute-bound, so padding costs as much as real tokens."""
    chunks: list[list[int]] = []
    for index, length in enumerate(lengths):
        if chunks and length >= (1.0 - max_padding) * lengths[chunks[-1][0]]:
            chunks[-1].append(index)
        else:
            chunks.append([index])
    return chunks


@dataclass
class _Prefix:
    """The shared prefix's KV cache (batch 1), per layer (keys, values)."""
    length: int
    layers: list


def _run_prefix(model, ids: list[int], device) -> _Prefix:
    if not ids:
        return _Prefix(0, [])
    return _Prefix(len(ids), prefix_cache(model, torch.tensor([ids], device=device)))


class _PreallocatedLayer(DynamicLayer):
    """One layer's KV cache in buffers sized for the whole generation, so that a decode step writes its token in
    place: transformers' DynamicLayer grows by torch.cat, which reallocates and copies the whole cache every step
    (half of a decode step at 32 rows of ~500 tokens here). keys/values are views of the live rows' filled part."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, filled: int):
        super().__init__()
        self.lazy_initialization(key_buffer, value_buffer)
        self.key_buffer, self.value_buffer = key_buffer, value_buffer
        self.rows, self.length = key_buffer.shape[0], filled
        self._set_views()

    def _set_views(self) -> None:
        self.keys = self.key_buffer[:self.rows, :, :self.length]
        self.values = self.value_buffer[:self.rows, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:  # only when drafts were written and rejected: grow by half
            room = max(end, self.key_buffer.shape[-2] * 3 // 2) - self.key_buffer.shape[-2]
            self.key_buffer = F.pad(self.key_buffer, (0, 0, 0, room))
            self.value_buffer = F.pad(self.value_buffer, (0, 0, 0, room))
        self.key_buffer[:self.rows, :, self.length:end] = key_states
        self.value_buffer[:self.rows, :, self.length:end] = value_states
        self.length = end
        self._set_views()
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.key_buffer = self.key_buffer[:self.rows].repeat_interleave(repeats, dim=0)
        self.value_buffer = self.value_buffer[:self.rows].repeat_interleave(repeats, dim=0)
        self.rows = self.key_buffer.shape[0]
        self._set_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows `indices` (old row numbers, in their new order). Only rows whose place changes are
        copied, so dropping finished rows in the order `_compacted` gives copies a few rows, not the cache."""
        moved = [(new, old) for new, old in enumerate(indices.tolist()) if new != old]
        if moved:
            targets, sources = (torch.tensor(side, device=self.key_buffer.device) for side in zip(*moved))
            self.key_buffer[targets] = self.key_buffer[sources]
            self.value_buffer[targets] = self.value_buffer[sources]
        self.rows = len(indices)
        self._set_views()


def _compacted(going_on: list[int]) -> list[int]:
    """New row order when only the rows `going_on` (sorted) continue: a continuing row keeps its place when that
    place is still inside the batch; the places of finished rows are taken by continuing rows from the end."""
    n, continuing = len(going_on), set(going_on)
    movers = iter(row for row in going_on if row >= n)
    return [row if row in continuing else next(movers) for row in range(n)]


class _BatchBuffers:
    """A decode batch's keys and values per layer, in buffers with room for the whole generation. Prefill chunks
    write into them in place, so the batch's cache is never built twice. A layer's buffers are made when its first
    keys are known (the shared prefix's, or the first chunk's): they give the number of heads and the head size.
    Unfilled places stay zero (masked out; garbage there could be inf/nan, which a mask does not cancel)."""

    def __init__(self, rows: int, width: int, room: int):
        self.rows, self.width, self.room = rows, width, room
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def chunk_layer(self, index: int, rows: slice, start: int, like: torch.Tensor,
                    prefix: tuple | None = None) -> _PreallocatedLayer:
        """Layer `index` of the rows `rows`, from column `start` on, holding the shared prefix when given."""
        if index == len(self.keys):
            shape = (self.rows, like.shape[1], self.width + self.room, like.shape[3])
            self.keys.append(like.new_zeros(shape))
            self.values.append(like.new_zeros(shape))
        keys, values = self.keys[index][rows, :, start:], self.values[index][rows, :, start:]
        filled = 0
        if prefix is not None:
            filled = prefix[0].shape[-2]
            keys[:, :, :filled], values[:, :, :filled] = prefix
        return _PreallocatedLayer(keys, values, filled)

    def decode_cache(self) -> Cache:
        return Cache(layers=[_PreallocatedLayer(keys, values, filled=self.width)
                             for keys, values in zip(self.keys, self.values)])


class _ChunkCache(Cache):
    """The cache one prefill chunk runs with: views of its rows of the batch's buffers, shared prefix first."""

    def __init__(self, buffers: _BatchBuffers, rows: slice, start: int, prefix: _Prefix):
        super().__init__(layers=[buffers.chunk_layer(index, rows, start, keys, (keys, values))
                                 for index, (keys, values) in enumerate(prefix.layers)])
        self.buffers, self.rows, self.start = buffers, rows, start

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == len(self.layers):  # no shared prefix: the layer is made when its first keys arrive
            self.layers.append(self.buffers.chunk_layer(layer_idx, self.rows, self.start, key_states))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def _prefill(model, prefix: _Prefix, suffixes: list[list[int]], chunks: list[list[int]], pad_id: int, room: int):
    """Run a decode batch's prompts (sorted longest first, after the shared prefix) chunk by chunk into one KV
    cache with room for `room` more tokens per row. Rows are laid out as [pad][prefix][pad][suffix], left-padded
    to the longest, and every real token gets the position it would have alone. Returns the cache, the 2-D
    attention mask, each row's next position and its last-token logits."""
    device = next(model.parameters()).device
    width = prefix.length + len(suffixes[0])
    buffers = _BatchBuffers(len(suffixes), width, room)
    masks, logits = [], []
    for chunk in chunks:
        rows, chunk_width = slice(chunk[0], chunk[-1] + 1), len(suffixes[chunk[0]])
        input_ids = torch.full((len(chunk), chunk_width), pad_id, dtype=torch.long, device=device)
        suffix_mask = torch.zeros((len(chunk), chunk_width), dtype=torch.long, device=device)
        for row, index in enumerate(chunk):
            input_ids[row, chunk_width - len(suffixes[index]):] = torch.tensor(suffixes[index], device=device)
            suffix_mask[row, chunk_width - len(suffixes[index]):] = 1
        prefix_mask = torch.ones((len(chunk), prefix.length), dtype=torch.long, device=device)
        attention_mask = torch.cat([prefix_mask, suffix_mask], dim=1)
        position_ids = (prefix.length + suffix_mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = _ChunkCache(buffers, rows, start=width - attention_mask.shape[1], prefix=prefix)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True, logits_to_keep=last_positions(1, chunk_width, device))
        masks.append(F.pad(attention_mask, (width - attention_mask.shape[1], 0)))
        logits.append(out.logits[:, -1, :])
    positions = torch.tensor([prefix.length + len(ids) for ids in suffixes], device=device)
    return buffers.decode_cache(), torch.cat(masks), positions, torch.cat(logits)


def _sdpa_grouped_query(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, except where several query tokens per row attend under a mask (prefill
    chunks, steps that check guesses): there transformers copies the keys and values for every query head
    (repeat_kv), ~7x slower here than stacking a group's query heads along the sequence, as it does for one."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, length, dim = query.shape
    if (groups == 1 or length == 1 or attention_mask is None or attention_mask.dtype != torch.bool
            or attention_mask.shape[1] != 1 or kwargs.get("dropout", 0.0) or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    stacked = query.reshape(batch, heads // groups, groups * length, dim)  # a group's heads one after another
    out = F.scaled_dot_product_attention(stacked, key, value, attn_mask=attention_mask.repeat(1, 1, groups, 1),
                                         scale=kwargs.get("scaling"))
    return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register("sdpa_grouped_query", _sdpa_grouped_query)
AttentionMaskInterface.register("sdpa_grouped_query", sdpa_mask)


@contextmanager
def _generating(model):
    """Evaluation mode, and _sdpa_grouped_query in place of SDPA attention, while generating."""
    was_training, config = model.training, model.config
    attention = config._attn_implementation
    model.eval()
    if attention == "sdpa":
        config._attn_implementation = "sdpa_grouped_query"
    try:
        yield
    finally:
        config._attn_implementation = attention
        model.train(was_training)


NUCLEUS_CANDIDATES = (64, 1024)  # top-p sampling looks for the nucleus among this many most likely tokens first


def nucleus(scores: torch.Tensor, top_p: float, candidates: int):
    """Each row's top-p nucleus of softmax(scores), as transformers' TopPLogitsWarper keeps it (the smallest set of
    most likely tokens whose mass reaches top_p): (token ids, their probabilities, 0 outside the nucleus), both
    (rows, candidates), found among the `candidates` most likely tokens without sorting the whole vocabulary; None
    when some row's nucleus is larger than that (the caller then takes the full path)."""
    k = min(candidates, scores.shape[-1])
    top, index = scores.topk(k, dim=-1)  # sorted, most likely first
    probs = (top - torch.logsumexp(scores, dim=-1, keepdim=True)).exp()
    mass_before = probs.cumsum(dim=-1) - probs
    if k < scores.shape[-1] and not bool((mass_before[:, -1] + probs[:, -1] >= top_p).all()):
        return None
    return index, probs.masked_fill(mass_before >= top_p, 0.0)  # the most likely token always stays


def sample_nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor | None:
    """One token per row drawn from its nucleus (nucleus(), among NUCLEUS_CANDIDATES most likely tokens, the
    fewest first), or None. On a CPU, sorting 49,152 logits per row and a multinomial over all of them were over 40%
    of a 16-row decode step, and a top-1024 still 10%; this draws among the candidates only."""
    found = next((found for found in (nucleus(scores, top_p, k) for k in NUCLEUS_CANDIDATES) if found), None)
    if found is None:
        return None
    index, probs = found
    return index.gather(-1, torch.multinomial(probs, num_samples=1)).squeeze(1)


def _token_chooser(settings: GenerationSettings):
    remove_inf_nan = InfNanRemoveLogitsProcessor()
    warpers = LogitsProcessorList()
    if settings.do_sample:
        warpers.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_p < 1.0:
            warpers.append(TopPLogitsWarper(settings.top_p))

    def choose(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float()
        if not torch.isfinite(scores).all():  # one pass to check; the replacement makes several
            scores = remove_inf_nan(None, scores)
        if settings.do_sample and settings.top_p < 1.0:
            chosen = sample_nucleus(scores / settings.temperature, settings.top_p)
            if chosen is not None:
                return chosen
        scores = warpers(None, scores)
        if settings.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        return scores.argmax(dim=-1)

    return choose


def stop_rule(tokenizer, settings: GenerationSettings):
    """ends(ids): whether a row whose newest token is ids[-1] is finished (end-of-turn / EOS, or the end of its
    first complete JSON object; only a token holding a "}" can complete one, so only then is the text decoded)."""
    stops = set(stop_token_ids(tokenizer))
    closing = _closing_brace_tokens(tokenizer) if settings.stop_at_json_end else set()

    def ends(ids: list[int]) -> bool:
        return ids[-1] in stops or (ids[-1] in closing and
                                    json_object_end(tokenizer.decode(ids, skip_special_tokens=True)) >= 0)

    return ends


class PromptLookup:
    """Guesses a row's next tokens from its own text so far (prompt and answer): the tokens that followed the
    latest earlier occurrence of its last n tokens, longest n first. FinQA answers copy numbers, table labels and
    operation names from the prompt, and repeat themselves ("#0", the answer's number)."""

    def __init__(self, ids: list[int], max_ngram: int = 3):
        self.ids: list[int] = []
        self.max_ngram = max_ngram
        self.following: dict[tuple, int] = {}  # n-gram -> index of the token after its latest occurrence
        for token in ids:
            self.append(token)

    def append(self, token: int) -> None:
        self.ids.append(token)
        end = len(self.ids) - 1  # the n-grams that end just before the new token are followed by it
        for n in range(1, min(self.max_ngram, end) + 1):
            self.following[tuple(self.ids[end - n:end])] = end

    def draft(self, n_tokens: int) -> list[int]:
        for n in range(min(self.max_ngram, len(self.ids)), 0, -1):
            start = self.following.get(tuple(self.ids[-n:]))
            if start is not None:
                return self.ids[start:start + n_tokens]
        return []


def _decode(model, cache, mask, positions, logits, choose, ends, max_new_tokens: int,
            lookups: list[PromptLookup] | None = None, n_guesses: int = 0):
    """Decode every row from its prefilled state, all rows in one forward pass per step; a finished row leaves
    the batch. Each row's generated ids and finish reason, and the number of forward passes.

    With prompt lookups (greedy decoding only), each row also feeds the n_guesses tokens its lookup guesses next; the
    same pass scores them all, and a row keeps its guesses up to the first one that differs from the token the
    model chooses there, plus that choice: speculative decoding with drafts from the prompt. It yields the tokens
    one-at-a-time decoding would (the model verifies every token), in fewer passes. Rejected guesses stay in the
    cache, masked out."""
    generated: list[list[int]] = [[] for _ in range(mask.shape[0])]
    finish = ["length"] * len(generated)
    active, steps = list(range(len(generated))), 0
    chosen = [[token] for token in choose(logits).tolist()]  # per active row; the last is not in the cache yet
    while True:
        going_on = []  # batch positions of the rows that continue
        for index, row in enumerate(active):
            for token in chosen[index]:
                generated[row].append(token)
                if lookups:
                    lookups[row].append(token)
                if ends(generated[row]):
                    finish[row] = "stop"
                    break
                if len(generated[row]) >= max_new_tokens:
                    break
            else:
                going_on.append(index)
        if not going_on:
            return generated, finish, steps
        last = [tokens[-1] for tokens in chosen]
        if len(going_on) < len(active):
            order = _compacted(going_on)
            keep = torch.tensor(order, device=mask.device)
            cache.batch_select_indices(keep)
            mask, positions = mask[keep], positions[keep]
            active, last = [active[i] for i in order], [last[i] for i in order]
        guesses = [lookups[row].draft(n_guesses) if lookups else [] for row in active]
        # rows with fewer guesses are filled up with their last token: checked like any guess
        input_ids = torch.tensor([[token] + guess + [token] * (n_guesses - len(guess))
                                  for token, guess in zip(last, guesses)], device=mask.device)
        width = input_ids.shape[1]
        offsets = torch.arange(width, device=mask.device)
        mask = torch.cat([mask, mask.new_ones((len(active), width))], dim=1)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions.unsqueeze(1) + offsets,
                    past_key_values=cache, use_cache=True)
        steps += 1
        choices = choose(out.logits.reshape(-1, out.logits.shape[-1])).view(len(active), width).tolist()
        chosen, accepted = [], []
        for fed, choice in zip(input_ids[:, 1:].tolist(), choices):
            n_right = next((i for i, (guess, right) in enumerate(zip(fed, choice)) if guess != right), len(fed))
            chosen.append(fed[:n_right] + [choice[n_right]])
            accepted.append(n_right)
        n_accepted = torch.tensor(accepted, device=mask.device)
        mask[:, -width:] = (offsets <= n_accepted.unsqueeze(1)).to(mask.dtype)
        cache, positions = out.past_key_values, positions + 1 + n_accepted


def is_token_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(t, int) for t in prompt)


def encode_prompt(tokenizer, prompt) -> list[int]:
    """A prompt's token ids: given as ids, or a rendered string, or chat messages (the tokenizer's chat template)."""
    if is_token_ids(prompt):
        return list(prompt)
    text = prompt if isinstance(prompt, str) else render_prompt(tokenizer, prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate(model, tokenizer, prompts: list, settings: GenerationSettings, desc: str = "generating",
             seed: int | None = None, stats: GenerationStats | None = None,
             show_progress: bool = True, shard: tuple[int, int] = (0, 1)) -> list[list[Generation]]:
    """num_return_sequences generations per prompt, in the prompts' order.

    prompts: chat messages (rendered with the tokenizer's chat template), already rendered strings, or token ids.
    shard (index, count): generate only every count-th batch from index on (several processes: utils.processes);
    the other prompts' lists stay empty. Batches are formed as with one process, so each holds the same prompts.
    """
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[list[Generation]] = [[] for _ in encoded]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    k = settings.num_return_sequences
    choose, ends = _token_chooser(settings), stop_rule(tokenizer, settings)
    device = next(model.parameters()).device
    shard_index, shard_count = shard
    if seed is not None:
        torch.manual_seed(seed + 7919 * shard_index)  # each process samples its own stream
    stats = stats if stats is not None else GenerationStats()
    compute = getattr(torch, settings.compute_dtype)
    mixed = compute != torch.float32 and next(model.parameters()).dtype == torch.float32
    with _generating(model), torch.autocast(device.type, dtype=compute, enabled=mixed):
        started = time.time()
        prefix_length = shared_prefix_length(encoded)
        prefix = _run_prefix(model, encoded[0][:prefix_length] if encoded else [], device)
        seconds = time.time() - started
        stats.n_prefill_tokens += prefix_length
        stats.prefill_seconds += seconds
        stats.seconds += seconds
        per_batch = max(1, settings.batch_size // k)
        batches = [order[i: i + per_batch] for i in range(0, len(order), per_batch)][shard_index::shard_count]
        bar = tqdm(batches, desc=desc, unit="batch", disable=not show_progress)
        for batch in bar:
            started = time.time()
            suffixes = [encoded[i][prefix_length:] for i in batch]
            chunks = prefill_chunks([len(ids) for ids in suffixes])
            cache, mask, positions, logits = _prefill(model, prefix, suffixes, chunks, pad_id, settings.max_new_tokens)
            if k > 1:
                cache.batch_repeat_interleave(k)
                mask, positions, logits = (t.repeat_interleave(k, dim=0) for t in (mask, positions, logits))
            prefilled = time.time()
            lookups = ([PromptLookup(encoded[i]) for i in batch for _ in range(k)]
                       if settings.lookup_draft_tokens and not settings.do_sample else None)
            generated, finish, steps = _decode(model, cache, mask, positions, logits, choose, ends,
                                               settings.max_new_tokens, lookups, settings.lookup_draft_tokens)
            rows = [prompt_index for prompt_index in batch for _ in range(k)]
            for prompt_index, ids, reason in zip(rows, generated, finish):
                results[prompt_index].append(Generation(text=tokenizer.decode(ids, skip_special_tokens=True).strip(),
                                                        token_ids=ids, finish_reason=reason))
            finished = time.time()
            n_tokens = sum(map(len, generated))
            n_prefill = sum(len(chunk) * len(suffixes[chunk[0]]) for chunk in chunks)
            stats.n_prompts += len(batch)
            stats.n_sequences += len(rows)
            stats.n_generated_tokens += n_tokens
            stats.n_prefill_tokens += n_prefill
            stats.n_prompt_tokens += sum(len(encoded[i]) for i in batch)
            stats.n_decode_steps += steps
            stats.prefill_seconds += prefilled - started
            stats.decode_seconds += finished - prefilled
            stats.seconds += finished - started
            stats.per_batch.append({"size": len(batch), "prompt_length": len(encoded[batch[0]]),
                                    "prefill_chunks": len(chunks), "tokens": n_tokens, "decode_steps": steps,
                                    "prefill_seconds": round(prefilled - started, 3),
                                    "seconds": round(finished - started, 3)})
            bar.set_postfix(tok_s=f"{stats.tokens_per_second:.0f}")
    return results


def settings_from_config(config: dict, sampled: bool, **overrides) -> GenerationSettings:
    gen = config["generation"]
    settings = GenerationSettings(max_new_tokens=gen["max_new_tokens"], batch_size=gen["batch_size"],
                                  do_sample=sampled, temperature=gen["temperature"] if sampled else 1.0,
                                  top_p=gen["top_p"] if sampled else 1.0, lookup_draft_tokens=gen["lookup_draft_tokens"],
                                  compute_dtype=precision(config).dtype)
    for key, value in overrides.items():
        if value is not None:
            setattr(settings, key, value)
    return settings
