"""Issue 32: a checkpoint folder whose files are broken (weights truncated, empty or random; a base_adapters.json
that loops, lists what is not an adapter or has the wrong shape; a config that is not JSON) gives one `error:`
line naming the file, before any model loads, and leaves every file as it was."""
import itertools
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import one_error
from test_safety import snapshot
from utils.models import BASE_ADAPTERS_FILE, checkpoint_problem, load_model


@pytest.fixture(scope="module")
def lora_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A real LoRA adapter saved by peft on the tiny model (B is random, so merging it changes the weights)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter)
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def prepared(run_stage):
    assert run_stage("01_prepare_dataset.py") == 0
    return run_stage


@pytest.fixture
def no_model_loads(monkeypatch):
    """A broken checkpoint is reported before the (possibly large) base model is read."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the checkpoint was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def adapter_copy(lora_adapter: Path, dest: Path, adapters: list | None = None) -> Path:
    shutil.copytree(lora_adapter, dest)
    if adapters is not None:
        (dest / BASE_ADAPTERS_FILE).write_text(json.dumps({"adapters": [str(a) for a in adapters]}))
    return dest


def broken_bytes(good: bytes) -> dict:
    return {"truncated": good[:len(good) // 2], "empty": b"", "random": os.urandom(len(good))}


LABELS = itertools.count()


def refused(run, capsys, script: str, ckpt: Path, *needles: str) -> str:
    """Run `script --policy_ckpt ckpt`: one error naming the flag, the folder and needles; the checkpoint and
    every earlier output as they were (the failed stage records its failure in a folder of its own: a new
    evaluation label each time)."""
    before, outputs = snapshot(ckpt), snapshot(run.root / "outputs")
    label = ("--label", f"x{next(LABELS)}") if script == "10_evaluate.py" else ()
    assert run(script, *label, "--policy_ckpt", str(ckpt), "--quick_test") == 1
    line = one_error(capsys, "--policy_ckpt", str(ckpt), *needles)
    after = snapshot(run.root / "outputs")
    assert snapshot(ckpt) == before and {name: after.get(name) for name in outputs} == outputs
    return line


def test_adapter_weights_that_are_not_safetensors(prepared, lora_adapter, capsys, tmp_path, no_model_loads):
    good = (lora_adapter / "adapter_model.safetensors").read_bytes()
    for kind, data in broken_bytes(good).items():
        ckpt = adapter_copy(lora_adapter, tmp_path / kind)
        (ckpt / "adapter_model.safetensors").write_bytes(data)
        refused(prepared, capsys, "10_evaluate.py", ckpt, f"{ckpt / 'adapter_model.safetensors'}: not a readable "
                                                          f"safetensors file")
    # a header that covers no tensors: peft would load it and silently leave the adapter at its initial weights
    ckpt = adapter_copy(lora_adapter, tmp_path / "no_tensors")
    (ckpt / "adapter_model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    refused(prepared, capsys, "10_evaluate.py", ckpt, "adapter_model.safetensors: holds no tensors")
    # a broken adapter beneath a good one is named too
    top = adapter_copy(lora_adapter, tmp_path / "top", [tmp_path / "empty"])
    refused(prepared, capsys, "10_evaluate.py", top, str(tmp_path / "empty" / "adapter_model.safetensors"))


@pytest.mark.parametrize("script", ["04_generate_candidates.py", "06_train_grpo.py"])
def test_other_stages_check_the_adapter_the_same_way(prepared, lora_adapter, capsys, tmp_path, no_model_loads,
                                                     script):
    ckpt = adapter_copy(lora_adapter, tmp_path / "truncated")
    (ckpt / "adapter_model.safetensors").write_bytes((lora_adapter / "adapter_model.safetensors").read_bytes()[:100])
    refused(prepared, capsys, script, ckpt, "adapter_model.safetensors: not a readable safetensors file")


def test_merged_model_weights_that_are_not_safetensors(prepared, tiny_model_dir, capsys, tmp_path, no_model_loads):
    good = (tiny_model_dir / "model.safetensors").read_bytes()
    for kind, data in broken_bytes(good).items():
        ckpt = tmp_path / kind
        shutil.copytree(tiny_model_dir, ckpt)
        (ckpt / "model.safetensors").write_bytes(data)
        refused(prepared, capsys, "10_evaluate.py", ckpt, f"{ckpt / 'model.safetensors'}: not a readable")
    # sharded: the index's shards are checked, and the index is read as JSON of the right shape
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00001.safetensors")
    (sharded / "model-00001-of-00001.safetensors").write_bytes(good[:len(good) // 3])
    index = sharded / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}))
    refused(prepared, capsys, "10_evaluate.py", sharded, "model-00001-of-00001.safetensors: not a readable")
    index.write_text(json.dumps({"weight_map": ["model-00001-of-00001.safetensors"]}))
    refused(prepared, capsys, "10_evaluate.py", sharded, f"{index}: not a weights index")


def test_base_model_weights_that_are_not_safetensors(run_stage, tiny_model_dir, capsys, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").write_bytes(b"")
    before = snapshot(model)
    assert run_stage("01_prepare_dataset.py", "--set", f"model.path={model}") == 1
    one_error(capsys, "model.path", f"{model / 'model.safetensors'}: not a readable safetensors file")
    assert snapshot(model) == before


def test_base_adapters_that_loop_or_are_not_adapters(prepared, lora_adapter, tiny_model_dir, capsys, tmp_path,
                                                     no_model_loads):
    itself = adapter_copy(lora_adapter, tmp_path / "itself")
    (itself / BASE_ADAPTERS_FILE).write_text(json.dumps({"adapters": [str(itself)]}))
    refused(prepared, capsys, "10_evaluate.py", itself, f"{itself / BASE_ADAPTERS_FILE}: lists the checkpoint itself")

    first, second = adapter_copy(lora_adapter, tmp_path / "first"), adapter_copy(lora_adapter, tmp_path / "second")
    (first / BASE_ADAPTERS_FILE).write_text(json.dumps({"adapters": [str(second)]}))
    (second / BASE_ADAPTERS_FILE).write_text(json.dumps({"adapters": [str(first)]}))
    refused(prepared, capsys, "10_evaluate.py", first, f"{first / BASE_ADAPTERS_FILE}: lists {second}", "a cycle")

    for listed, needle in ((tmp_path / "missing", "which is not a folder"),
                           (tiny_model_dir, "which is not a LoRA adapter folder"),
                           (Path("/etc"), "which is not a LoRA adapter folder")):
        ckpt = adapter_copy(lora_adapter, tmp_path / f"lists_{listed.name}", [listed])
        refused(prepared, capsys, "10_evaluate.py", ckpt, f"{ckpt / BASE_ADAPTERS_FILE}: lists {listed}", needle)


def test_base_adapters_must_be_the_stack_beneath(lora_adapter, tiny_model_dir, tmp_path):
    bottom = adapter_copy(lora_adapter, tmp_path / "bottom")
    middle = adapter_copy(lora_adapter, tmp_path / "middle", [bottom])
    top = adapter_copy(lora_adapter, tmp_path / "top", [bottom, middle])
    assert checkpoint_problem(top) is None  # what save_adapter writes: each one lists the adapters before it
    load_model(tiny_model_dir, top)
    # the middle adapter was trained on nothing, yet top merges it on bottom: not the stack it was trained on
    (middle / BASE_ADAPTERS_FILE).unlink()
    assert f"{top / BASE_ADAPTERS_FILE}: lists {middle} on top of" in checkpoint_problem(top)
    (top / BASE_ADAPTERS_FILE).write_text(json.dumps({"adapters": [str(bottom), str(bottom)]}))
    assert f"lists {bottom} twice" in checkpoint_problem(top)


@pytest.mark.parametrize("text, needle", [
    ("[]", 'not {"adapters": [folders]}'),
    ('"adapters"', 'not {"adapters": [folders]}'),
    ('{"adapters": "x"}', 'not {"adapters": [folders]}'),
    ('{"adapters": [1]}', 'not {"adapters": [folders]}'),
    ('{"adapters": [' + "9" * 5000 + "]}", "Exceeds the limit"),
    ("{not json", "not a readable JSON file"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_base_adapters_json_of_the_wrong_shape(prepared, lora_adapter, capsys, tmp_path, no_model_loads, text,
                                               needle):
    ckpt = adapter_copy(lora_adapter, tmp_path / "ckpt")
    (ckpt / BASE_ADAPTERS_FILE).write_text(text)
    refused(prepared, capsys, "10_evaluate.py", ckpt, f"{ckpt / BASE_ADAPTERS_FILE}: ", needle)


@pytest.mark.parametrize("name, content, needle", [
    ("adapter_config.json", b"[1, 2]", "not a LoRA adapter config"),
    ("adapter_config.json", b'{"peft_type": "PROMPT_TUNING"}', "not a LoRA adapter config"),
    ("adapter_config.json", b'{"peft_type": "LORA", "r": ' + b"9" * 5000 + b"}", "Exceeds the limit"),
    ("adapter_config.json", b'{"peft_type": "\xff"}', "not UTF-8"),
    ("config.json", b"[]", "not a JSON object"),
    ("config.json", b'{"vocab_size": ' + b"9" * 5000 + b"}", "Exceeds the limit"),
    ("config.json", b"{", "not a readable JSON file"),
])
def test_configs_that_are_not_json_objects(prepared, lora_adapter, tiny_model_dir, capsys, tmp_path, no_model_loads,
                                           name, content, needle):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(lora_adapter if name == "adapter_config.json" else tiny_model_dir, ckpt)
    (ckpt / name).write_bytes(content)
    refused(prepared, capsys, "10_evaluate.py", ckpt, f"{ckpt / name}: ", needle)
    if name == "adapter_config.json":  # the same file in an adapter beneath a good one
        top = adapter_copy(lora_adapter, tmp_path / "top", [ckpt])
        refused(prepared, capsys, "10_evaluate.py", top, f"{ckpt / name}: ", needle)
