#!/bin/sh
# The CUDA worker's entry point. Its binary links the NVIDIA driver's libcuda.so.1 (candle links the driver; it
# cannot load it lazily), so without the driver the process would not start at all and the loader would say only
# "cannot open shared object file". Say what is missing and how to fix it instead; a driver without a usable GPU
# is the worker's own start-up error (`ModelLoadError: no usable GPU: ...`).
set -eu
worker="$(dirname "$0")/moltbot-inference-worker.bin"
if ldd "$worker" | grep -q 'libcuda.so.1 => not found'; then
  echo "moltbot-inference-worker: the NVIDIA driver (libcuda.so.1) is not in this container. Run it with NVIDIA's" \
       "container toolkit (docker run --gpus all; on Kubernetes a pod that requests nvidia.com/gpu from NVIDIA's" \
       "device plugin), or run the CPU image with model_provider.gpu_layers: 0." >&2
  exit 1
fi
exec "$worker" "$@"
