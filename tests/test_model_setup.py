"""Model setup: LoRA target discovery, scripts/add_model_config.py, model folder checks, configs/models/*.yaml.
Fast (seconds), no downloads: a tiny Llama is built locally."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conftest import flatten_dict  # noqa: E402
from utils.model_download import default_dest_for, is_complete_model_dir  # noqa: E402
from utils.model_inspect import describe_model, find_lora_targets, suggest_settings  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REFERENCE_CONFIG = REPO / "configs" / "models" / "smollm2-135m.yaml"
MODEL_CONFIGS = sorted((REPO / "configs" / "models").glob("*.yaml"))


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=False)


def _save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, **{f"w{i}": i + 3 for i in range(97)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A saved 2-layer Llama (hidden 32, vocab 100) with a tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama") / "tiny-llama"
    torch.manual_seed(0)
    LlamaForCausalLM(_tiny_config()).save_pretrained(folder)
    _save_tokenizer(folder)
    return folder


def _run_add_config(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "add_model_config.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


# --- find_lora_targets / describe_model ----------------------------------------------------------------

def test_find_lora_targets_tiny_llama():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_tiny_config())
    targets = find_lora_targets(model)
    assert targets == PROJECTIONS
    assert "lm_head" not in targets and not any("embed" in t for t in targets)


def test_find_lora_targets_on_meta_device_and_tied_head():
    import torch
    from transformers import AutoModelForCausalLM

    config = _tiny_config()
    config.tie_word_embeddings = True
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert find_lora_targets(model) == PROJECTIONS
    info = describe_model(config, model=model)
    assert info["architecture"] == "llama"
    assert (info["hidden_size"], info["num_layers"], info["vocab_size"]) == (32, 2, 100)
    # exact count: embeddings (tied head counted once) + 2 x (attention + MLP + 2 norms) + final norm
    attn = 32 * 32 + 2 * (32 * 16) + 32 * 32  # q, k/v (2 kv heads of dim 8), o
    mlp = 3 * 32 * 64
    assert info["n_params"] == 100 * 32 + 2 * (attn + mlp + 2 * 32) + 32


def test_find_lora_targets_skips_heads_outside_blocks():
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_proj = nn.Linear(4, 4)
            self.gate = nn.Linear(4, 2)  # an MoE router: not a LoRA target

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(10, 4)
            self.layers = nn.ModuleList([Block(), Block()])
            self.proj_in = nn.Linear(4, 4)  # outside the repeated blocks
            self.lm_head = nn.Linear(4, 10)
            self.score = nn.Linear(4, 1)

    assert find_lora_targets(Net()) == ["attn_proj"]


def test_suggest_settings_by_size():
    small, mid, big, huge = (suggest_settings(n) for n in (135e6, 5e8, 1.5e9, 8e9))
    assert small["dtype"] == mid["dtype"] == big["dtype"] == huge["dtype"] == "auto"  # chosen per machine
    assert small["torch_threads"] == 2 and "bf16" not in small
    assert huge["learning_rate"] < big["learning_rate"] <= small["learning_rate"]
    assert huge["gradient_checkpointing"]
    short = suggest_settings(135e6, max_positions=512)
    assert short["max_seq_length"] <= 512 and short["max_prompt_tokens"] + short["max_new_tokens"] <= 512


# --- scripts/add_model_config.py -------------------------------------------------------------------------

def test_add_model_config_writes_reference_structure(tiny_llama, tmp_path):
    out = tmp_path / "tiny.yaml"
    proc = _run_add_config("--model", str(tiny_llama), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(out.read_text())
    ref = yaml.safe_load(REFERENCE_CONFIG.read_text())
    assert list(cfg) == list(ref)  # every section, in the same order
    assert set(flatten_dict(cfg)) == set(flatten_dict(ref))  # and every key
    assert cfg["model"]["name"] == "tiny-llama"
    assert Path(cfg["model"]["path"]) == tiny_llama.resolve()
    assert cfg["model"]["architecture"] == "llama"
    assert cfg["model"]["dtype"] == "auto" and cfg["model"]["torch_threads"] == 2
    assert cfg["lora"]["target_modules"] == PROJECTIONS
    assert isinstance(cfg["training"]["learning_rate"], float)
    assert cfg["training"]["max_seq_length"] <= 256  # capped by the tiny model's context
    # the comments of the reference survive
    text = out.read_text()
    for comment in ("# per-model compute settings shared by every training stage", "quick_test:"):
        assert comment in text


def test_add_model_config_refuses_to_overwrite(tiny_llama, tmp_path):
    out = tmp_path / "tiny.yaml"
    assert _run_add_config("--model", str(tiny_llama), "--output", str(out)).returncode == 0
    out.write_text(out.read_text() + "# hand edit\n")
    before = out.read_text()
    proc = _run_add_config("--model", str(tiny_llama), "--output", str(out), "--name", "other")
    assert proc.returncode != 0
    assert "exists" in proc.stderr and "--force" in proc.stderr
    assert out.read_text() == before
    sys.path.insert(0, str(REPO / "scripts"))
    import add_model_config as amc  # in-process: same code, no second interpreter start

    assert amc.main(["--model", str(tiny_llama), "--output", str(out), "--force",
                     "--set", "training.batch_size=3", "--name", "Other Name"]) == 0
    cfg = yaml.safe_load(out.read_text())
    assert cfg["training"]["batch_size"] == 3 and cfg["model"]["name"] == "other-name"


def test_add_model_config_bad_inputs(tmp_path):
    proc = _run_add_config("--model", str(tmp_path), "--output", str(tmp_path / "x.yaml"))
    assert proc.returncode != 0 and "config.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.yaml").exists()


def test_fill_template_keeps_comments_and_rejects_unknown_keys():
    sys.path.insert(0, str(REPO / "scripts"))
    import add_model_config as amc

    template = ("# Old model description.\n# Every key can be overridden\nmodel:\n"
                "  dtype: float32        # a comment\n  name: old\ntraining:   # section comment\n"
                "  learning_rate: 2.0e-4\n")
    text = amc.fill_template(template, {"model.dtype": "bfloat16", "training.learning_rate": 5e-5}, ["# New."])
    assert text.splitlines()[:2] == ["# New.", "# Every key can be overridden"]
    assert "  dtype: bfloat16       # a comment" in text
    assert "training:   # section comment" in text
    assert yaml.safe_load(text) == {"model": {"dtype": "bfloat16", "name": "old"}, "training": {"learning_rate": 5e-5}}
    with pytest.raises(KeyError):
        amc.fill_template(template, {"model.nope": 1}, [])


# --- model folders ----------------------------------------------------------------------------------------

def test_is_complete_model_dir(tiny_llama, tmp_path):
    assert is_complete_model_dir(tiny_llama)
    assert not is_complete_model_dir(tmp_path / "missing")
    partial = tmp_path / "partial"
    partial.mkdir()
    assert not is_complete_model_dir(partial)
    (partial / "config.json").write_text((tiny_llama / "config.json").read_text())
    assert not is_complete_model_dir(partial)  # no weights
    (partial / "model.safetensors").write_bytes((tiny_llama / "model.safetensors").read_bytes())
    assert not is_complete_model_dir(partial)  # no tokenizer
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (partial / name).write_text((tiny_llama / name).read_text())
    assert is_complete_model_dir(partial)
    # sharded weights: every shard the index names must be there
    (partial / "model.safetensors").rename(partial / "model-00001-of-00002.safetensors")
    (partial / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert not is_complete_model_dir(partial)
    (partial / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert is_complete_model_dir(partial)


def test_default_dest_for_hub_ids():
    assert default_dest_for("Qwen/Qwen2.5-0.5B-Instruct") == REPO / "models" / "qwen2.5-0.5b-instruct"
    assert default_dest_for("HuggingFaceTB/SmolLM2-135M-Instruct").name == "smollm2-135m-instruct"


def test_model_download_cli_reports_hub_failure_in_one_line(tmp_path, monkeypatch):
    """--hub_id with no hub reachable: one clear error line and a non-zero exit, nothing left behind."""
    from utils import model_download

    class FailingApi:
        def __init__(self, *a, **k):
            pass

        def model_info(self, *a, **k):
            raise ConnectionError("no route to the hub")

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "HfApi", FailingApi)
    dest = tmp_path / "m"
    assert model_download.main(["--hub_id", "org/Some-Model", "--dest", str(dest)]) == 1
    assert not dest.exists()


# --- configs/models/*.yaml --------------------------------------------------------------------------------

@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=[p.name for p in MODEL_CONFIGS])
def test_model_configs_share_structure(path):
    ref = yaml.safe_load(REFERENCE_CONFIG.read_text())
    cfg = yaml.safe_load(path.read_text())
    assert list(cfg) == list(ref), f"{path.name}: top-level sections differ from {REFERENCE_CONFIG.name}"
    targets = cfg["lora"]["target_modules"]
    assert isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    assert "lm_head" not in targets
    model = cfg["model"]
    assert model["path"] == f"models/{model['name']}"
    assert model["dtype"] == "auto"
    assert model["hub_id"] and default_dest_for(model["hub_id"]).name == model["name"]
    assert "bf16" not in cfg["training"]  # the precision comes from model.dtype alone
    assert isinstance(cfg["training"]["learning_rate"], float) and 0 < cfg["training"]["learning_rate"] < 1e-2
    assert cfg["data"]["max_prompt_tokens"] + cfg["generation"]["max_new_tokens"] <= cfg["training"]["max_seq_length"] + 64


def test_expected_gpu_configs_present():
    names = {p.stem for p in MODEL_CONFIGS}
    assert {"smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b", "llama-3.2-1b", "tinyllama-1.1b", "llama-3-8b"} <= names
