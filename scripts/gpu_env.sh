# Source on the lent GPU machine (no internet, its own torch): makes sparsecnn and the
# carried wheels in .whl/ importable without pip touching the machine's environment.
#   source scripts/gpu_env.sh
site=/tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || return 1
fi
mkdir -p "$site/sparsecnn"
for d in common converter models passes runtimes; do ln -sfn "$PWD/$d" "$site/sparsecnn/$d"; done
ln -sfn "$PWD/__init__.py" "$site/sparsecnn/__init__.py"  # the package itself: the lazy Python API, __version__
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export SPARSECNN_CACHE=/tmp/sparsecnn-cache
# A kernel cache filled off the card and carried along (NVRTC needs no GPU, and the cache key holds no
# paths): `SPARSECNN_CACHE=.carry/cache sparsecnn doctor --compile-kernels sm_90` here, then
# SPARSECNN_CACHE_SEED=.carry/cache there. It spares a fresh card minutes of compiling.
if [ -n "${SPARSECNN_CACHE_SEED:-}" ] && [ -d "$SPARSECNN_CACHE_SEED/kernels" ]; then
  mkdir -p "$SPARSECNN_CACHE/kernels" && cp -n "$SPARSECNN_CACHE_SEED"/kernels/* "$SPARSECNN_CACHE/kernels/"
fi
