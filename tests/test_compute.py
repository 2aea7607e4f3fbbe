"""Issue 18: `model.dtype: auto` (bf16 only where the device runs it natively and measurably fast), bf16 training
steps that keep the trainable parameters in float32, and the precision in every model stage's manifest."""
import torch

from utils import compute
from utils.compute import choose_precision
from utils.runs import read_manifest

CPU = torch.device("cpu")


def probe(speedup: float) -> dict:
    return {"torch_threads": 2, "min_speedup": speedup,
            "shapes": [{"shape": [64, 576, 1536], "fp32_gflops": 100.0, "bf16_gflops": 100.0 * speedup,
                        "speedup": speedup}]}


def fresh_choice(monkeypatch, flags, speedup):
    compute._cpu_choice.cache_clear()
    monkeypatch.setattr(compute, "cpu_bf16_flags", lambda: flags)
    monkeypatch.setattr(compute, "probe_cpu_matmul", lambda: probe(speedup))
    try:
        return choose_precision("auto", CPU)
    finally:
        compute._cpu_choice.cache_clear()


def test_auto_picks_bf16_only_when_native_and_measured_fast(monkeypatch):
    fast = fresh_choice(monkeypatch, ["amx_bf16"], 3.7)
    assert fast.dtype == "bfloat16" and fast.probe["min_speedup"] == 3.7 and "amx_bf16" in fast.reason
    slow = fresh_choice(monkeypatch, ["avx512_bf16"], 1.1)  # listed, but the probe says it does not pay
    assert slow.dtype == "float32" and "1.1x" in slow.reason
    monkeypatch.setattr(compute, "probe_cpu_matmul", lambda: (_ for _ in ()).throw(AssertionError("probed")))
    compute._cpu_choice.cache_clear()
    monkeypatch.setattr(compute, "cpu_bf16_flags", lambda: [])
    none = choose_precision("auto", CPU)  # an AVX2-only CPU is never probed (bf16 is emulated there)
    compute._cpu_choice.cache_clear()
    assert none.dtype == "float32" and "no native bf16" in none.reason and none.probe is None


def test_explicit_dtypes_force_it():
    assert choose_precision("float32", CPU).dtype == "float32"
    forced = choose_precision("bfloat16", CPU)
    assert forced.dtype == "bfloat16" and forced.torch_dtype == torch.bfloat16 and "set in the config" in forced.reason
    assert choose_precision("float16", CPU).dtype == "float32"  # no fast float16 on a CPU
    # frozen weights are held in the compute dtype for training and inference alike
    assert forced.training_weights_dtype == torch.bfloat16 and forced.inference_dtype == torch.bfloat16


def test_bf16_training_step_changes_the_adapter_and_keeps_fp32_state(tiny_model_dir):
    from peft import get_peft_model

    from utils.config import load_config
    from utils.models import load_model, lora_config

    config = load_config("configs/models/smollm2-135m.yaml")
    torch.manual_seed(0)
    weights = choose_precision("bfloat16", CPU).training_weights_dtype
    model = get_peft_model(load_model(tiny_model_dir, dtype=weights, trainable=True), lora_config(config))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)  # no casts of them per op
    # LoRA B starts at zero: give it a value so both factors receive gradients
    for name, p in trainable.items():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with choose_precision("bfloat16", CPU).autocast():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16  # the matmuls ran in bf16
    out.loss.backward()
    optimizer.step()
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32  # the loss reduction in float32
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert all(state["exp_avg"].dtype == torch.float32 for state in optimizer.state.values())
    assert any(not torch.equal(before[name], p) for name, p in trainable.items())


def test_model_stages_record_their_precision(run_stage):
    assert run_stage("01_prepare_dataset.py") == 0
    assert run_stage("10_evaluate.py", "--base", "--quick_test", "--set", "model.dtype=bfloat16") == 0
    record = read_manifest(run_stage.stage_dir("10_evaluation") / "base")["precision"]
    assert record == {"dtype": "bfloat16", "requested": "bfloat16", "device": "cpu",
                      "reason": "model.dtype bfloat16 (set in the config)", "probe": None}


def test_merged_copy_generates_what_the_adapter_computes_and_follows_its_updates(tiny_model_dir):
    from peft import get_peft_model

    from utils.config import load_config
    from utils.models import MergedCopy, load_model, lora_config

    config = load_config("configs/models/smollm2-135m.yaml")
    torch.manual_seed(0)
    policy = get_peft_model(load_model(tiny_model_dir, dtype=torch.float32, trainable=True), lora_config(config))
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    policy.eval()
    ids = torch.randint(0, policy.config.vocab_size, (2, 12))
    copy = MergedCopy(policy)
    with torch.no_grad():
        assert torch.allclose(copy.model(0)(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-4)
        assert not any(name for name, _ in copy.model(0).named_modules() if "lora" in name)
        for name, p in policy.named_parameters():  # an optimizer step
            if "lora_A" in name:
                p.add_(0.1)
        stale = copy.model(0)(input_ids=ids).logits  # the same version: not refreshed
        fresh = copy.model(1)(input_ids=ids).logits
        expected = policy(input_ids=ids).logits
    assert not torch.allclose(stale, expected, atol=1e-4)
    assert torch.allclose(fresh, expected, atol=1e-4)
    # with frozen bf16 weights the copy is bf16 too, the adapter merged onto them without drift
    bf16 = get_peft_model(load_model(tiny_model_dir, dtype=torch.bfloat16, trainable=True), lora_config(config))
    copy = MergedCopy(bf16)
    assert all(p.dtype == torch.bfloat16 for p in copy.model(0).parameters())
    first = {n: p.clone() for n, p in copy.model(0).state_dict().items()}
    again = copy.model(1).state_dict()
    assert all(torch.equal(first[n], again[n]) for n in first)  # refreshing an unchanged adapter changes nothing


def test_fused_lm_head_scores_only_labelled_positions_on_a_cpu(tiny_model_dir, monkeypatch):
    """trl's fused LM head on a CPU, with score_labelled_positions_only: the vocabulary projection sees only the
    positions with a label, and the loss and gradients equal trl's own every-position scoring."""
    from peft import get_peft_model
    from trl.trainer import utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from utils.config import load_config
    from utils.models import load_model, lora_config
    from utils.training import score_labelled_positions_only

    config = load_config("configs/models/smollm2-135m.yaml")
    torch.manual_seed(0)
    model = load_model(tiny_model_dir, dtype=torch.float32, trainable=True)
    add_fused_lm_head(model)
    model = get_peft_model(model, lora_config(config))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    labels = ids.clone()
    labels[:, :15] = -100   # a prompt of 15 tokens
    labels[1, 18:] = -100   # and a shorter completion (padding)
    projected = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda hidden, *args: projected.append(hidden.shape[0]) or apply(hidden, *args))

    def loss_and_grads():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    try:
        score_labelled_positions_only(False)   # trl's rule on a CPU: every position
        every_loss, every_grads = loss_and_grads()
        score_labelled_positions_only()
        labelled_loss, labelled_grads = loss_and_grads()
    finally:
        score_labelled_positions_only()
    assert projected == [2 * 19, 5 + 3]         # shifted: 19 positions a row; then the labelled ones only
    torch.testing.assert_close(labelled_loss, every_loss)
    for name, grad in every_grads.items():
        torch.testing.assert_close(labelled_grads[name], grad, rtol=1e-4, atol=1e-6)
    assert any(grad.abs().sum() > 0 for grad in labelled_grads.values())


def test_kept_logits_by_index_equal_the_sliced_ones(tiny_model_dir):
    """utils.models.last_positions: logits_to_keep as indices gives the int slice's logits (in bf16 too), from a
    contiguous tensor (the LM head then runs as one matmul, not a batched one over copies of its weight)."""
    from utils.models import last_positions, load_model

    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(tiny_model_dir, dtype=dtype).eval()
        ids = torch.randint(0, model.config.vocab_size, (3, 17))
        with torch.no_grad():
            sliced = model(input_ids=ids, logits_to_keep=5).logits
            indexed = model(input_ids=ids, logits_to_keep=last_positions(5, 17)).logits
        assert indexed.shape == sliced.shape == (3, 5, model.config.vocab_size)
        torch.testing.assert_close(indexed, sliced)
    assert last_positions(1, 17).tolist() == [16]
