#!/usr/bin/env bash
# Checks a GPU machine with this checkout: `python -m brorl_jax.bench gpu`
# (the attention kernels against a float32 reference at the recipes' shapes,
# decode tokens/s, one update's TFLOP/s), on the machine's own JAX.
#
#   launch/gpu_check.sh --download            # where pip reaches PyPI: fills $WHEELS
#   launch/gpu_check.sh [bench gpu flags]     # on the GPU machine, no index needed
#   launch/gpu_check.sh --pytest              # tests/hardware instead of the bench
#
# Made for machines that ship JAX with its CUDA plugin (the lent H100s:
# jax 0.11.2, CUDA 13, Python 3.12, flax/optax/orbax/tensorstore preinstalled,
# no package index). The checkout runs from its directory (PYTHONPATH), with
# nothing of it installed; the pure-Python packages pinned below, the versions
# the CPU tests ran with jax 0.11.2, come as wheels from $WHEELS (default
# .whl, ~3 MB: it travels with the working tree) into a private target
# directory, over whatever versions the machine has. JAX itself is never
# replaced: its CUDA build is the machine's.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/brorl_gpu_site}
PYTHON=${PYTHON:-python3}
PURE=(flax==0.12.12 optax==0.2.8 orbax-checkpoint==0.12.8)

if [ "${1:-}" = "--download" ]; then
  mkdir -p "$WHEELS"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform any \
    -d "$WHEELS" "${PURE[@]}"
  ls -l "$WHEELS"
  exit 0
fi

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check: no wheels in $WHEELS: using the machine's own" \
       "${PURE[*]%%==*}" >&2
fi
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
"$PYTHON" - <<'EOF'
import importlib.metadata as md
import jax
names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorstore",
         "numpy")
print("versions:", ", ".join(f"{n} {md.version(n)}" for n in names))
print("devices:", jax.devices())
EOF
if [ "${1:-}" = "--pytest" ]; then
  shift   # tests/conftest.py defaults JAX_PLATFORMS to cpu
  JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} exec "$PYTHON" -m pytest -q \
    -p no:cacheprovider tests/hardware "$@"
fi
exec "$PYTHON" -m brorl_jax.bench gpu "$@"
