#!/usr/bin/env python
"""Write configs/models/<name>.yaml for a new model: one command, then every stage accepts --config.

    python scripts/add_model_config.py --model models/my-model            # a local folder
    python scripts/add_model_config.py --model Qwen/Qwen2.5-3B-Instruct    # a hub id (reads config.json only)

Reads the model's config, builds the model on the meta device (no weights, no memory) to list its Linear
layers, picks the LoRA targets (attention + MLP projections), and writes a YAML with the same sections and
comments as configs/models/smollm2-135m.yaml, with dtype / batch sizes / learning rate suited to its size.
Review the numbers before a long run. Existing files are never overwritten without --force.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _die(msg: str) -> "NoReturn":  # noqa: F821
    print(f"[add_model_config] error: {msg}", file=sys.stderr)
    sys.exit(1)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


def _repo_relative(path: Path) -> str:
    path = path.resolve()
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


TEMPLATE = REPO_ROOT / "configs" / "models" / "smollm2-135m.yaml"
_KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")


def _yaml_scalar(value) -> str:
    """A YAML scalar the way the hand-written configs spell them (2.0e-4, 0.05, [a, b], null)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.1e}".replace("e-0", "e-")  # PyYAML reads 2.0e-4 as a float (1e-4 would be a string)
        return repr(value)
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_./@+-]+", text) and text.lower() not in {"null", "true", "false", "yes", "no", "on", "off", "~"}:
        return text
    return json.dumps(text)


def _split_comment(rest: str) -> tuple[str, str | None, int]:
    """' value   # comment' -> ('value', 'comment', column offset of '#' within rest); no comment -> None."""
    in_quote = None
    for i, ch in enumerate(rest):
        if in_quote:
            in_quote = None if ch == in_quote else in_quote
        elif ch in "'\"":
            in_quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            return rest[:i].strip(), rest[i + 1:].strip(), i
    return rest.strip(), None, -1


def fill_template(template: str, values: dict[str, object], header: list[str]) -> str:
    """`template` (a model YAML) with the values of the dotted keys in `values` replaced, every other line and
    comment kept. The template's first comment line (its model description) is replaced by `header`.
    Raises KeyError naming any key of `values` the template does not have."""
    out, stack, used = [], [], set()
    lines = template.splitlines()
    first_comment_dropped = False
    for line in lines:
        if not first_comment_dropped and line.startswith("#"):
            out.extend(header)
            first_comment_dropped = True
            continue
        m = _KEY_LINE.match(line)
        if not m or line.lstrip().startswith("#"):
            out.append(line)
            continue
        indent, key = len(m["indent"]), m["key"]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        value_text, comment, _ = _split_comment(m["rest"])
        if not value_text:  # a section header: `training:   # comment`
            stack.append((indent, key))
            out.append(line)
            continue
        if path in values:
            used.add(path)
            head = f"{m['indent']}{key}: {_yaml_scalar(values[path])}"
            if comment is not None:
                column = len(line) - len(line.lstrip()) + len(key) + 1 + _split_comment(m["rest"])[2]
                head = f"{head.ljust(column - 1)} # {comment}" if len(head) < column else f"{head}  # {comment}"
            out.append(head)
        else:
            out.append(line)
    missing = sorted(set(values) - used)
    if missing:
        raise KeyError(f"{TEMPLATE.name} has no key(s) {', '.join(missing)}")
    return "\n".join(out) + "\n"


def render_config(*, name: str, path: str, hub_id: str | None, description: dict, targets: list[str],
                  source: str, template: str | None = None, overrides: dict[str, object] | None = None) -> str:
    """The YAML text: configs/models/smollm2-135m.yaml with this model's values filled in."""
    from utils.model_inspect import format_params

    d, s = description, description["suggested"]
    size = format_params(d["n_params"])
    on_cpu = s["torch_threads"] != 0
    kv = d["num_key_value_heads"]
    heads = f"{d['num_attention_heads']} heads" + (f" ({kv} key/value)" if kv and kv != d["num_attention_heads"] else "")
    header = [
        f"# {name}: {d['architecture']}, ~{size} parameters; hidden size {d['hidden_size']}, {d['num_layers']} layers, "
        f"{heads},",
        f"# MLP {d['intermediate_size']}, vocabulary {d['vocab_size']}, context {d['max_position_embeddings']}"
        f"{', tied embeddings' if d['tie_word_embeddings'] else ''}. "
        + ("Small enough for a CPU." if on_cpu else "Meant for a GPU."),
        f"# Written by scripts/add_model_config.py from {source}; review the numbers before a long run.",
    ]
    values = {
        "model.name": name,
        "model.path": path,
        "model.hub_id": hub_id,
        "model.architecture": d["architecture"],
        "model.dtype": s["dtype"],
        "model.torch_threads": s["torch_threads"],
        "lora.r": s["lora_r"],
        "lora.alpha": s["lora_alpha"],
        "lora.dropout": s["lora_dropout"],
        "lora.target_modules": list(targets),
        "data.max_prompt_tokens": s["max_prompt_tokens"],
        "training.batch_size": s["batch_size"],
        "training.gradient_accumulation_steps": s["gradient_accumulation_steps"],
        "training.learning_rate": s["learning_rate"],
        "training.max_seq_length": s["max_seq_length"],
        "training.gradient_checkpointing": s["gradient_checkpointing"],
        "generation.batch_size": s["gen_batch_size"],
        "generation.max_new_tokens": s["max_new_tokens"],
    }
    values.update(overrides or {})
    if template is None:
        if not TEMPLATE.is_file():
            _die(f"the template {TEMPLATE} is missing")
        template = TEMPLATE.read_text()
    text = fill_template(template, values, header)
    if not str(values["model.path"]).startswith("models/"):
        text = text.replace("# folder written by download.sh", "# local model folder", 1)
    return text


def _parse_override(text: str) -> tuple[str, object]:
    import yaml

    if "=" not in text or not text.split("=", 1)[0].strip():
        raise argparse.ArgumentTypeError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", required=True, help="a local model folder (with config.json) or a Hugging Face hub id")
    ap.add_argument("--name", default=None,
                    help="config name (default: the folder name / last part of the hub id, lower-cased)")
    ap.add_argument("--output", type=Path, default=None, help="where to write (default: configs/models/NAME.yaml)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output file")
    ap.add_argument("--set", dest="overrides", action="append", type=_parse_override, default=[],
                    metavar="SECTION.KEY=VALUE", help="override a value in the written file (repeatable), "
                    "e.g. --set training.batch_size=16")
    args = ap.parse_args(argv)

    local = Path(args.model).expanduser()
    is_local = local.is_dir()
    if not is_local and (local.exists() or args.model.startswith((".", "/", "~")) or args.model.count("/") > 1):
        _die(f"{args.model} is not a model folder (expected a directory with config.json, or a hub id like org/name)")
    if is_local and not (local / "config.json").is_file():
        _die(f"{local} has no config.json")

    hub_id = None
    if is_local:
        source_json = local / "SOURCE.json"
        if source_json.is_file():
            try:
                hub_id = json.loads(source_json.read_text()).get("hub_id")
            except (OSError, ValueError):
                hub_id = None
        default_name = _slug(local.resolve().name)
        model_path = _repo_relative(local)
    else:
        hub_id = args.model
        default_name = _slug(args.model.rstrip("/").split("/")[-1])
        model_path = f"models/{default_name}"  # where `bash download.sh --model HUB_ID` puts it
    name = _slug(args.name) if args.name else default_name
    output = args.output or (REPO_ROOT / "configs" / "models" / f"{name}.yaml")
    if output.exists() and not args.force:
        _die(f"{output} exists; pass --force to overwrite it")

    try:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(str(local) if is_local else args.model)
    except Exception as e:  # unknown architecture, no network for a hub id, bad json...
        where = "folder" if is_local else "hub id (reading it needs the Hugging Face hub)"
        _die(f"cannot read the model config from {where} {args.model}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    from utils.model_inspect import build_empty_model, describe_model, find_lora_targets, format_params
    try:
        model = build_empty_model(config)
    except Exception as e:
        _die(f"cannot build a {config.model_type} model from its config: {type(e).__name__}: {e}")
    targets = find_lora_targets(model)
    if not targets:
        _die(f"found no attention/MLP Linear layers in {type(model).__name__}; write lora.target_modules by hand")
    description = describe_model(config, model=model)

    try:
        text = render_config(name=name, path=model_path, hub_id=hub_id, description=description,
                             targets=targets, source=("the folder " + model_path) if is_local else hub_id,
                             overrides=dict(args.overrides))
    except KeyError as e:
        _die(str(e.args[0]))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(output)
    print(f"[add_model_config] wrote {_repo_relative(output)}: {description['architecture']}, "
          f"{format_params(description['n_params'])} parameters, dtype {description['suggested']['dtype']}, "
          f"LoRA targets {targets}")
    if not is_local:
        print(f"[add_model_config] get the weights with: bash download.sh --model {hub_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
