#!/bin/bash
# Before an engine (re)starts, wait until no process holds its GPUs: a stopped engine's NCCL
# teardown keeps device memory for 30-60 s and a new engine started on top of it OOMs (seed 003).
# Usage: kimi-wait-gpus-free GPU_IDS (comma-separated). Bounded; exits 1 so systemd retries later.
set -euo pipefail
ids=${1:?GPU ids, e.g. 0,1,2,3}
timeout=${GPU_FREE_TIMEOUT:-__GPU_FREE_TIMEOUT__}

busy() {
  if command -v nvidia-smi >/dev/null; then
    [[ -n $(nvidia-smi --query-compute-apps=pid --format=csv,noheader -i "$ids" 2>/dev/null) ]]
  elif [[ -e /dev/davinci_manager ]] && command -v fuser >/dev/null; then
    local id
    for id in ${ids//,/ }; do fuser -s "/dev/davinci$id" 2>/dev/null && return 0; done
    return 1
  else
    return 1
  fi
}

if ! command -v nvidia-smi >/dev/null && [[ ! -e /dev/davinci_manager ]]; then
  echo "no per-GPU process query on this host: not waiting"
  exit 0
fi
for ((waited = 0; waited < timeout; waited += 5)); do
  if ! busy; then echo "GPUs $ids free"; exit 0; fi
  sleep 5
done
echo "GPUs $ids still in use after ${timeout}s" >&2
exit 1
