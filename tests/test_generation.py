"""The shared generation module on the tiny model."""
import torch

from utils.generation import GenerationSettings, JsonEndCriteria, generate, json_object_end
from utils.models import load_model, load_tokenizer
from utils.prompts import prompt_messages


def test_json_object_end():
    assert json_object_end('{"program": "add(1, 2)", "answer": "3"} trailing') == 39
    assert json_object_end('prose {"a": "}"}') == len('prose {"a": "}"}')
    assert json_object_end('{"a": {"b": 1}') == -1
    assert json_object_end("no json") == -1
    assert json_object_end('{"a": "\\"}"}') == len('{"a": "\\"}"}')


def test_batched_greedy_equals_one_at_a_time(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    prompts = [prompt_messages(f"question {i} " + "word " * (i * 7), "revenue | 100 | 90") for i in range(5)]
    settings = GenerationSettings(max_new_tokens=12, batch_size=4, stop_at_json_end=False)
    batched = generate(model, tokenizer, prompts, settings, show_progress=False)
    single = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=12, batch_size=1,
                                                                    stop_at_json_end=False), show_progress=False)
    assert [g[0].token_ids for g in batched] == [g[0].token_ids for g in single]
    assert all(g[0].finish_reason in ("stop", "length") for g in batched)


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
