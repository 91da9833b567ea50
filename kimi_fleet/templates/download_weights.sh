#!/bin/bash
# Download the pinned revision into WEIGHTS_DIR, resumably, and verify every file's size and
# content (SHA-256 of LFS files, git blob SHA-1 of the rest) against the repository tree at that
# revision. A `.kimi-verified` marker holding the revision makes a
# re-run a no-op. The Hugging Face token is read from HF_TOKEN_FILE and never printed.
set -euo pipefail
: "${WEIGHTS_DIR:?}" "${MODEL_REPO:?}" "${MODEL_REVISION:?}" "${WEIGHTS_SOURCE:?}"
MARKER="$WEIGHTS_DIR/.kimi-verified"
ATTEMPTS="${DOWNLOAD_ATTEMPTS:-5}"
ATTEMPT_TIMEOUT="${DOWNLOAD_ATTEMPT_TIMEOUT:-7200}"

if [[ -f $MARKER && $(<"$MARKER") == "$MODEL_REVISION" ]]; then
  echo "weights $MODEL_REPO@$MODEL_REVISION already verified"
  exit 0
fi
mkdir -p "$WEIGHTS_DIR"
if [[ -s ${HF_TOKEN_FILE:-} ]]; then
  HF_TOKEN=$(<"$HF_TOKEN_FILE")
  export HF_TOKEN
fi

fetch() {
  if [[ $WEIGHTS_SOURCE == s3-mirror ]]; then
    # Parallel transfers are what make the in-region mirror fast (~4 GB/s).
    local config
    config=$(mktemp)
    printf '[default]\ns3 =\n  max_concurrent_requests = 64\n  multipart_chunksize = 64MB\n' >"$config"
    AWS_CONFIG_FILE="$config" timeout "$ATTEMPT_TIMEOUT" aws s3 sync --only-show-errors \
      --region "$AWS_REGION" "${S3_MIRROR_URI%/}/$MODEL_REPO/$MODEL_REVISION/" "$WEIGHTS_DIR/"
    local status=$?
    rm -f "$config"
    return $status
  fi
  # hf resumes partial files; a hung transfer is killed by timeout and resumed by the next attempt.
  HF_XET_HIGH_PERFORMANCE=1 timeout "$ATTEMPT_TIMEOUT" "${HF_CLI:-hf}" download "$MODEL_REPO" \
    --revision "$MODEL_REVISION" --local-dir "$WEIGHTS_DIR"
}

verify() {
  python3 - "$MODEL_REPO" "$MODEL_REVISION" "$WEIGHTS_DIR" <<'PY'
import concurrent.futures, hashlib, json, os, re, sys, urllib.parse, urllib.request
repo, revision, local = sys.argv[1:4]
endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
url = f"{endpoint}/api/models/{repo}/tree/{revision}?recursive=true"
headers = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else {}
expected = {}
while url:  # the tree API pages through a Link: <...>; rel="next" header
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
        for entry in json.load(response):
            if entry.get("type") == "file":
                # LFS files (the shards) carry their SHA-256; the others a git blob SHA-1.
                expected[entry["path"]] = (entry["size"], (entry.get("lfs") or {}).get("oid"), entry.get("oid"))
        following = re.search(r'<([^>]+)>;\s*rel="next"', response.headers.get("Link") or "")
        url = urllib.parse.urljoin(url, following.group(1)) if following else None
# Hash one file (hashlib releases the GIL: the files hash in parallel); a file whose content is
# wrong is removed, with hf's resume metadata, so the next attempt fetches it again.
def content_problem(path, size, lfs_oid, git_oid):
    want = lfs_oid or git_oid
    if not want:
        return None
    digest = hashlib.sha256() if lfs_oid else hashlib.sha1(b"blob %d\0" % size)
    full = os.path.join(local, path)
    with open(full, "rb") as stream:
        for chunk in iter(lambda: stream.read(16 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() == want:
        return None
    for stale in (full, os.path.join(local, ".cache", "huggingface", "download", path + ".metadata")):
        if os.path.exists(stale):
            os.remove(stale)
    kind = "sha256" if lfs_oid else "git sha1"
    return f"content of {path}: {kind} {digest.hexdigest()}, repository says {want} (removed, fetched again next)"
problems = []
present = []
for path, (size, lfs_oid, git_oid) in sorted(expected.items()):
    full = os.path.join(local, path)
    if not os.path.isfile(full):
        problems.append(f"missing {path}")
    elif os.path.getsize(full) != size:
        problems.append(f"size of {path}: {os.path.getsize(full)} bytes, repository says {size}")
    else:
        present.append((path, size, lfs_oid, git_oid))
with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 4)) as pool:
    problems += [p for p in pool.map(lambda item: content_problem(*item), present) if p]
total = sum(size for size, _, _ in expected.values())
print(f"verify: {len(expected)} files, {total} bytes expected, contents hashed; {len(problems)} problem(s)")
if problems:
    print("\n".join(problems[:20]))
sys.exit(1 if problems or not expected else 0)
PY
}

for ((attempt = 1; attempt <= ATTEMPTS; attempt++)); do
  echo "download attempt $attempt/$ATTEMPTS of $MODEL_REPO@$MODEL_REVISION ($WEIGHTS_SOURCE)"
  if fetch && verify; then
    printf '%s\n' "$MODEL_REVISION" >"$MARKER"
    echo "weights verified: $MARKER"
    exit 0
  fi
  sleep $((attempt * 20))
done
echo "weights download failed after $ATTEMPTS attempts" >&2
exit 1
