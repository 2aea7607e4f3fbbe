"""Shared fixtures: a tiny model with a real chat-template tokenizer built locally (no downloads), synthetic
FinQA-format data, and a runner that executes stage scripts in-process with their real command line."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402,F401  (before torch: sets the threading environment; see utils/__init__.py)

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def synthetic_entry(index: int) -> dict:
    """A FinQA-format entry whose gold program's answer is computed here by plain arithmetic."""
    a, b = 1000 + 37 * index, 800 + 11 * index
    kind = index % 4
    table = [["", "2019", "2018"], ["revenue", f"$ {a:,}", f"{b:,}"], ["costs", f"{b // 2}", f"{a // 3} ( 1 )"]]
    if kind == 0:
        program, exe_ans, answer = f"subtract({a}, {b}), divide(#0, {b})", round((a - b) / b, 5), ""
    elif kind == 1:
        program, exe_ans, answer = f"add({a}, {b})", float(a + b), str(a + b)
    elif kind == 2:
        program, exe_ans, answer = "table_sum(revenue, none)", float(a + b), str(a + b)
    else:
        program, exe_ans, answer = f"greater({a}, {b})", "yes", "yes"
    return {
        "id": f"SYN/{2019 - index % 3}/page_{index}.pdf-{index % 5}",
        "pre_text": [f"revenue was ${a:,} million in 2019 .", "the company operates in many markets ."],
        "post_text": [f"costs were {b // 2} million ."],
        "table": table,
        "qa": {"question": f"what was the change in revenue {index}?", "program": program, "exe_ans": exe_ans,
               "answer": answer,
               "gold_inds": {"table_1": f"the revenue of 2019 is ${a:,} ; the revenue of 2018 is {b:,} ;"}},
    }


def write_finqa(folder: Path, sizes=(12, 6, 6)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for name, size in zip(("train.json", "dev.json", "test.json"), sizes):
        (folder / name).write_text(json.dumps([synthetic_entry(i) for i in range(start, start + size)]))
        start += size
    return folder


def build_tiny_model(folder: Path) -> Path:
    """A 2-layer Llama and a byte-level BPE tokenizer with ChatML special tokens and a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [json.dumps(synthetic_entry(i)) for i in range(40)] + [
        '{"program": "subtract(5829, 5735), divide(#0, 5735)", "answer": "1.6%"}', "system user assistant"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def finqa_dir(tmp_path) -> Path:
    return write_finqa(tmp_path / "finqa")


def load_stage(script: str):
    spec = importlib.util.spec_from_file_location(script.replace(".py", "").replace("-", "_"), REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script: str, *args: str) -> int:
    """Run a stage script's main in this process as `python script args...`; returns its exit code."""
    module = load_stage(script)
    argv = sys.argv
    sys.argv = [script, *args]
    try:
        module.main_guard(module.main)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        sys.argv = argv
    return 0


def flatten_dict(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class StageRunner:
    """Runs stage scripts in-process with a command line, against the tiny model and tmp folders."""

    def __init__(self, root: Path, model_dir: Path, raw_dir: Path):
        self.root = root
        self.base = ["--set", f"model.path={model_dir}", "--set", f"data.raw_dir={raw_dir}",
                     "--set", f"data.processed_dir={root / 'processed'}", "--set", f"paths.outputs_dir={root / 'outputs'}",
                     "--set", "generation.max_new_tokens=16", "--set", "generation.batch_size=4"]

    def __call__(self, script: str, *args: str) -> int:
        return run_script(script, *self.base, *args)

    def stage_dir(self, folder: str, run_id: str = "run_001") -> Path:
        return self.root / "outputs" / run_id / folder


@pytest.fixture
def run_stage(tmp_path, tiny_model_dir, finqa_dir) -> StageRunner:
    return StageRunner(tmp_path, tiny_model_dir, finqa_dir)


@pytest.fixture
def prepared(run_stage) -> StageRunner:
    """A run with 01 (processed data) and 02 (reward spec) done."""
    assert run_stage("01_prepare_dataset.py") == 0
    assert run_stage("02_build_rewards.py") == 0
    return run_stage


def one_error(capsys, *needles: str) -> str:
    """The single `error:` line on stderr (no traceback), which names every needle."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
