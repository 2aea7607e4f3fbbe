"""The shared generation module on the tiny model."""
from collections import Counter

import pytest
import torch

from utils import generation
from utils.generation import (GenerationSettings, GenerationStats, JsonEndCriteria, PromptLookup, generate,
                              json_object_end)
from utils.models import load_model, load_tokenizer
from utils.prompts import prompt_messages, render_prompt


def test_json_object_end():
    assert json_object_end('{"program": "add(1, 2)", "answer": "3"} trailing') == 39
    assert json_object_end('prose {"a": "}"}') == len('prose {"a": "}"}')
    assert json_object_end('{"a": {"b": 1}') == -1
    assert json_object_end("no json") == -1
    assert json_object_end('{"a": "\\"}"}') == len('{"a": "\\"}"}')


@pytest.mark.parametrize("lookup_draft_tokens, shared_prefix", [(0, True), (3, True), (3, False)])
def test_batched_greedy_equals_plain_generate_one_at_a_time(tiny_model_dir, monkeypatch, lookup_draft_tokens,
                                                            shared_prefix):
    """Shared prefix, length-chunked prefill with padding in the middle, written into a preallocated KV cache,
    rows leaving the batch as they finish (others moving into their places), guesses from prompt lookup checked
    in one pass: none of it may change what greedy decoding produces compared with transformers' own generate on
    each prompt alone. Prompts that share no first token take the path where the cache's buffers are made from
    the first chunk's keys."""
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # the fixture's weights make every prompt repeat one token: diversify them
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    texts = [render_prompt(tokenizer, prompt_messages(f"question {i} " + "word " * (i * 7), "revenue | 100 | 90"))
             for i in range(8)]
    if not shared_prefix:
        texts = [f"{first} {text}" for first, text in zip(["alpha", "beta", "gamma", "delta", "epsilon", "zeta",
                                                               "eta", "theta"], texts)]
    inputs = [tokenizer(text, return_tensors="pt", add_special_tokens=False) for text in texts]
    assert (generation.shared_prefix_length([x["input_ids"][0].tolist() for x in inputs]) > 0) == shared_prefix

    def plain(stops):
        outs = [model.generate(**x, max_new_tokens=12, do_sample=False, temperature=None, top_p=None, top_k=None,
                               eos_token_id=stops, pad_token_id=tokenizer.pad_token_id) for x in inputs]
        return [out[0, x["input_ids"].shape[1]:].tolist() for out, x in zip(outs, inputs)]

    # The stop token: one of the tokens these answers hold, chosen so that rows finish at different steps and a
    # continuing row has to move into the place of a finished one (the cache's compaction is then exercised).
    unstopped = plain(None)
    compactions = []

    def recording_compacted(going_on):
        order = compacted(going_on)
        compactions.append(order != going_on)
        return order

    compacted = generation._compacted
    monkeypatch.setattr(generation, "_compacted", recording_compacted)
    settings = GenerationSettings(max_new_tokens=12, batch_size=8, stop_at_json_end=False,
                                  lookup_draft_tokens=lookup_draft_tokens)
    for stop, _ in Counter(token for ids in unstopped for token in set(ids)).most_common():
        monkeypatch.setattr(generation, "stop_token_ids", lambda _: [stop])
        stats, compactions[:] = GenerationStats(), []
        batched = generate(model, tokenizer, texts, settings, stats=stats, show_progress=False)
        if any(compactions):
            break
    assert any(compactions)
    assert len(stats.per_batch) == 1 and stats.per_batch[0]["prefill_chunks"] > 1  # lengths vary enough to split
    if shared_prefix:
        assert stats.n_prefill_tokens < stats.n_prompt_tokens  # the shared prefix ran once
    expected = plain([stop])
    for group, plain_ids in zip(batched, expected):
        assert group[0].token_ids == plain_ids
        assert group[0].finish_reason == ("length" if len(plain_ids) == 12 and plain_ids[-1] != stop else "stop")
    if lookup_draft_tokens:  # some guesses were right: fewer passes than the longest answer needs one at a time
        assert stats.n_decode_steps < max(map(len, expected)) - 1


def test_prompt_lookup_guesses_what_followed_the_latest_match():
    lookup = PromptLookup([5, 6, 7, 8, 1, 6, 7, 9, 4])
    lookup.append(6)
    assert lookup.draft(2) == [7, 9]  # (6,) was last followed by 7, 9: the latest occurrence wins
    lookup.append(7)
    lookup.append(8)
    assert lookup.draft(3) == [1, 6, 7]  # (6, 7, 8) matches the start: the longest n-gram that matches
    lookup.append(3)
    assert lookup.draft(3) == []  # 3 never occurred before


def test_preallocated_cache_keeps_the_rows_it_is_told_to(tiny_model_dir):
    keys, values = torch.randn(6, 2, 10, 4), torch.randn(6, 2, 10, 4)
    layer = generation._PreallocatedLayer(keys.clone(), values.clone(), filled=7)
    layer.update(torch.ones(6, 2, 1, 4), torch.ones(6, 2, 1, 4))
    expected_keys = torch.cat([keys[:, :, :7], torch.ones(6, 2, 1, 4)], dim=2)
    order = generation._compacted([1, 3, 4, 5])  # rows 0 and 2 finished
    assert sorted(order) == [1, 3, 4, 5] and order[1] == 1 and order[3] == 3  # staying rows keep their places
    layer.batch_select_indices(torch.tensor(order))
    assert torch.equal(layer.keys, expected_keys[order]) and layer.get_seq_length() == 8
    layer.update(torch.zeros(4, 2, 2, 4), torch.zeros(4, 2, 2, 4))
    assert layer.keys.shape == (4, 2, 10, 4) and torch.equal(layer.keys[:, :, :8], expected_keys[order])


def test_rows_stop_at_json_end_and_others_continue(tiny_model_dir):
    """A scripted model: at the positions after prompt A it writes a JSON object token by token (then more text);
    anywhere else it writes "x". A is so much longer than B that B's positions never reach A's. A stops right
    after the closing brace and leaves the batch; B runs to max_new_tokens."""
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    prompts = ["A " + "long " * 40, "B prompt"]
    answer = tokenizer('{"program": "add(1, 2)", "answer": "3"} more', add_special_tokens=False)["input_ids"]
    filler = tokenizer("x", add_special_tokens=False)["input_ids"][0]
    first_answer_position = len(tokenizer(prompts[0], add_special_tokens=False)["input_ids"]) - 1
    assert len(tokenizer(prompts[1], add_special_tokens=False)["input_ids"]) + 20 < first_answer_position
    real_forward, batch_sizes = model.forward, []

    def scripted_forward(input_ids=None, position_ids=None, **kwargs):
        out = real_forward(input_ids=input_ids, position_ids=position_ids, **kwargs)
        batch_sizes.append(input_ids.shape[0])
        out.logits = torch.full_like(out.logits[:, -1:, :], -1e4)
        for row, position in enumerate(position_ids[:, -1].tolist()):
            step = position - first_answer_position
            out.logits[row, 0, answer[step] if 0 <= step < len(answer) else filler] = 0.0
        return out

    model.forward = scripted_forward
    out = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=20, batch_size=2),
                   show_progress=False)
    a, b = out[0][0], out[1][0]
    assert a.text == '{"program": "add(1, 2)", "answer": "3"}' and a.finish_reason == "stop"
    assert b.text == "x" * 20 and b.finish_reason == "length"
    assert 2 in batch_sizes and batch_sizes[-1] == 1  # A left the batch once it finished


def test_sampling_returns_k_per_prompt_in_order_and_is_seeded(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    prompts = [prompt_messages("long question " * 5, "x"), prompt_messages("short", "y")]
    settings = GenerationSettings(max_new_tokens=8, batch_size=2, do_sample=True, temperature=1.0, top_p=0.9,
                                  num_return_sequences=3)
    first = generate(model, tokenizer, prompts, settings, seed=3, show_progress=False)
    second = generate(model, tokenizer, prompts, settings, seed=3, show_progress=False)
    assert [len(group) for group in first] == [3, 3]
    assert [[g.token_ids for g in group] for group in first] == [[g.token_ids for g in group] for group in second]


def test_stops_at_end_of_json(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    criteria = JsonEndCriteria(tokenizer, prompt_length=2)
    for text, expected in (('{"program": "add(1, 2)", "answer": "3"}', True), ('{"program": "add(1', False)):
        ids = torch.tensor([[5, 6] + tokenizer(text, add_special_tokens=False)["input_ids"]])
        assert criteria(ids, None).tolist() == [expected]


def test_nan_logits_do_not_crash_sampling(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight[:5] = float("nan")  # tied with the embeddings: poisons the logits
        model.lm_head.weight[5:10] = float("inf")
    settings = GenerationSettings(max_new_tokens=6, batch_size=2, do_sample=True, temperature=0.8, top_p=0.9)
    out = generate(model, tokenizer, [prompt_messages("q", "c")] * 2, settings, seed=0, show_progress=False)
    assert len(out) == 2 and all(isinstance(g[0].text, str) for g in out)


def test_nucleus_keeps_what_transformers_top_p_keeps_without_sorting_the_vocabulary():
    from transformers import TopPLogitsWarper

    from utils.generation import nucleus, sample_nucleus

    torch.manual_seed(0)
    scores = torch.randn(6, 3000) * torch.tensor([[0.5], [1.0], [2.0], [4.0], [8.0], [16.0]])  # flat to peaked
    for top_p in (0.3, 0.9, 0.99):
        warped = TopPLogitsWarper(top_p)(None, scores.clone())
        index, probs = nucleus(scores, top_p, candidates=3000)
        ours = torch.zeros_like(scores).scatter(1, index, probs)
        assert torch.equal(ours > 0, torch.isfinite(warped))  # the same tokens kept
        expected = torch.softmax(warped, dim=-1)
        assert torch.allclose(ours / ours.sum(-1, keepdim=True), expected, atol=1e-6)  # with the same weights
    assert nucleus(scores[:1], 0.9, candidates=50) is None  # a flat row's nucleus is not among 50 tokens
    drawn = sample_nucleus(scores[5:].expand(4000, -1), 0.9)
    kept = torch.isfinite(TopPLogitsWarper(0.9)(None, scores[5:].clone()))[0]
    assert kept[drawn].all()  # every draw from the nucleus
