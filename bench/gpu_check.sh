#!/usr/bin/env bash
# One prepared GPU check (issue 19); what it runs and writes: bench/gpu_check.py's docstring.
#   bash bench/gpu_check.sh --out OUT        run it (on the GPU machine: diffusers from .whl/ when missing)
#   bash bench/gpu_check.sh --fetch-wheels   here, with PyPI: diffusers' wheel (this machine's version) into .whl/
set -u
cd "$(dirname "$0")/.." || exit 2
wheels=${MINEDIT_WHEELS:-.whl}            # the carried wheels (git-ignored)
site=${MINEDIT_SITE:-/tmp/minedit-site}  # where they are installed on the GPU machine
if [ "${1:-}" = "--fetch-wheels" ]; then
  version=$(python3 -c "import diffusers; print(diffusers.__version__)") || exit 2
  # Pure Python (py3-none-any); --no-deps: the GPU machine has its needs (huggingface-hub, safetensors, ...), and
  # importlib_metadata, which diffusers names, is only imported on Python < 3.8.
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$wheels" "diffusers==$version"
fi
if ! python3 -c "import diffusers" 2>/dev/null; then
  if ! ls "$wheels"/diffusers-*.whl >/dev/null 2>&1; then
    echo "error: diffusers is not installed and $wheels/ holds no diffusers wheel — run 'bash" \
      "bench/gpu_check.sh --fetch-wheels' where PyPI is reachable and carry $wheels along" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$wheels"/diffusers-*.whl || exit 2
  echo "installed $(ls "$wheels"/diffusers-*.whl) into $site"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec python3 bench/gpu_check.py "$@"
