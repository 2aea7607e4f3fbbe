# Usage: source activate.sh   (from any directory)
# Activates .venv and sets the environment the FinQA-RL scripts expect.
if [ -n "${BASH_SOURCE[0]:-}" ]; then _finqa_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"; else _finqa_root="$(cd "$(dirname "$0")" && pwd)"; fi
if [ ! -f "$_finqa_root/.venv/bin/activate" ]; then
    echo "[activate] no .venv in $_finqa_root; run: bash setup.sh" >&2
    unset _finqa_root
    return 1 2>/dev/null || exit 1
fi
. "$_finqa_root/.venv/bin/activate"
export FINQA_RL_ROOT="$_finqa_root"
case ":${PYTHONPATH:-}:" in *":$_finqa_root:"*) ;; *) export PYTHONPATH="$_finqa_root${PYTHONPATH:+:$PYTHONPATH}" ;; esac
export TOKENIZERS_PARALLELISM=false   # tokenizers' thread pool + DataLoader forks = warnings and deadlocks
export OMP_WAIT_POLICY=PASSIVE        # spinning OpenMP threads starve other processes on a small CPU
# HF_HUB_OFFLINE / HF_HOME are left as you set them: models are loaded from local folders under models/.
echo "[activate] .venv active ($(python --version 2>&1)); PYTHONPATH includes $_finqa_root"
unset _finqa_root
