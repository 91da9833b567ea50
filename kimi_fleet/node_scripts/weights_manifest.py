#!/usr/bin/env python3
"""What a checkpoint's files must be, and whether a directory holds exactly that (standard library
only: it runs on nodes, in the mirror-fill job and in tests).

    weights_manifest.py verify --dir D --hub REPO REVISION      # against the Hub's tree at REVISION
    weights_manifest.py verify --dir D --manifest M.json --manifest-sha256 HEX
                                                                # against a mirror's manifest (no Hub call),
                                                                # itself pinned by the deployer's digest
    weights_manifest.py manifest --dir D --hub REPO REVISION --out M.json
                                                                # verify D against the Hub, then write
                                                                # every path, size and SHA-256

Verification checks sizes, then hashes every file in parallel (SHA-256 of LFS files and of every
file in a manifest; the git blob SHA-1 of the Hub's small files). A file whose content is wrong is
removed (with hf's resume metadata), so the next attempt fetches it again. Exit 1 on any problem.

A mirror's manifest is trusted only through its SHA-256, which the deployer computes after checking
the manifest against the Hub's own tree (hub_manifest_problems: sizes, LFS SHA-256, and the small
files fetched from the Hub at the revision and hashed) and pins in the node's settings: whoever can
write the mirror's prefix cannot swap a checkpoint's .py file and its manifest together.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import sys
import urllib.parse
import urllib.request

#: Beside the files of <mirror>/<repo>/<revision>/, written last by the fill (node_files.WEIGHTS_MANIFEST_NAME).
MANIFEST_NAME = "kimi-fleet-manifest.json"
FORMAT = "kimi-fleet weights manifest v1"
#: Beside the manifest when a managed fill failed (its log's tail); a successful fill removes it.
FILL_FAILED_NAME = "kimi-fleet-fill-failed.txt"
#: Files hashed at once (hashlib releases the GIL: one thread per core, up to this many).
VERIFY_THREADS = 32
#: A node's copy of the mirror's manifest, beside its weights (written by weights_fetch.py).
LOCAL_MANIFEST_NAME = ".kimi-manifest.json"
#: weights_fetch.py's exit status for a mirror no retry can help: unfilled, another revision, bad
#: paths (not 2, which python itself uses for a missing script).
MIRROR_REFUSED_STATUS = 3


def s5cmd_base(binary: str) -> list[str]:
    """The start of every s5cmd command line of the mirror's scripts (fetch, fill, compile caches)."""
    base = [binary]
    if os.environ.get("AWS_ENDPOINT_URL"):  # a test's S3 server, or a VPC endpoint
        base += ["--endpoint-url", os.environ["AWS_ENDPOINT_URL"]]
    return base


def hub_tree(repo: str, revision: str) -> dict[str, tuple[int, str | None, str | None]]:
    """path -> (size, sha256 of LFS files, git blob sha1 of the rest), from the Hub's tree API."""
    url = f"{hub_endpoint()}/api/models/{repo}/tree/{revision}?recursive=true"
    headers = _hub_headers()
    expected = {}
    while url:  # the tree API pages through a Link: <...>; rel="next" header
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
            for entry in json.load(response):
                if entry.get("type") == "file":
                    expected[entry["path"]] = (entry["size"], (entry.get("lfs") or {}).get("oid"), entry.get("oid"))
            following = re.search(r'<([^>]+)>;\s*rel="next"', response.headers.get("Link") or "")
            url = urllib.parse.urljoin(url, following.group(1)) if following else None
    return expected


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _hub_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else {}


def manifest_sha256(data: bytes) -> str:
    """The digest a release pins: of the manifest's bytes exactly as stored in the mirror."""
    return hashlib.sha256(data).hexdigest()


def pinned_manifest_problem(data: bytes, pinned: str | None) -> str | None:
    """Why these manifest bytes are not the ones the deployer verified, or None."""
    if not pinned or not re.fullmatch(r"[0-9a-f]{64}", pinned):
        return (f"the release pins no manifest digest (MIRROR_MANIFEST_SHA256={pinned!r}): the deployer "
                "verifies the mirror's manifest against the Hub and pins it; redeploy")
    got = manifest_sha256(data)
    if got != pinned:
        return (f"manifest SHA-256 {got}, the release pins {pinned}: it changed after the deployer verified it "
                "against the Hub; refused (refill the mirror, then redeploy)")
    return None


def hub_manifest_problems(document: dict, repo: str, revision: str) -> list[str]:
    """Where a mirror's manifest disagrees with the Hub's own tree at `revision`: the same paths and
    sizes, the LFS files' SHA-256 as the Hub lists it, and the small files' SHA-256 of their
    content fetched from the Hub at the revision (a few MB; their git SHA-1 checked too)."""
    if (document.get("repo"), document.get("revision")) != (repo, revision):
        return [f"manifest describes {document.get('repo')}@{document.get('revision')}, not {repo}@{revision}"]
    hub = hub_tree(repo, revision)
    listed = {f["path"]: (f["size"], f["sha256"]) for f in document.get("files", [])}
    problems = [f"{path}: in the manifest, not in the Hub's tree" for path in sorted(set(listed) - set(hub))]
    problems += [f"{path}: in the Hub's tree, not in the manifest" for path in sorted(set(hub) - set(listed))]
    for path in sorted(set(listed) & set(hub)):
        (size, sha256), (hub_size, lfs_sha256, git_oid) = listed[path], hub[path]
        if size != hub_size:
            problems.append(f"{path}: size {size} in the manifest, {hub_size} on the Hub")
            continue
        if lfs_sha256 is None:
            url = f"{hub_endpoint()}/{repo}/resolve/{revision}/{urllib.parse.quote(path)}"
            with urllib.request.urlopen(urllib.request.Request(url, headers=_hub_headers()), timeout=120) as response:
                content = response.read()
            if git_oid and hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest() != git_oid:
                problems.append(f"{path}: the Hub served content whose git SHA-1 is not its tree's {git_oid}")
                continue
            lfs_sha256 = hashlib.sha256(content).hexdigest()
        if sha256 != lfs_sha256:
            problems.append(f"{path}: SHA-256 {sha256} in the manifest, {lfs_sha256} on the Hub")
    return problems


def manifest_tree(path: str, pinned_sha256: str | None = None) -> dict[str, tuple[int, str | None, str | None]]:
    data = open(path, "rb").read()
    if pinned_sha256 is not None:
        problem = pinned_manifest_problem(data, pinned_sha256)
        if problem:
            raise SystemExit(f"{path}: {problem}")
    document = json.loads(data)
    if document.get("format") != FORMAT:
        raise SystemExit(f"{path}: not a {FORMAT}")
    return {f["path"]: (f["size"], f["sha256"], None) for f in document["files"]}


def manifest_document(repo: str, revision: str, files: dict[str, tuple[int, str]]) -> dict:
    """The manifest of <repo>@<revision>: every path with its size and SHA-256, in path order."""
    return {"format": FORMAT, "repo": repo, "revision": revision,
            "files": [{"path": path, "size": size, "sha256": sha256} for path, (size, sha256) in sorted(files.items())]}


def _digest(full: str, size: int, sha256: bool) -> str:
    digest = hashlib.sha256() if sha256 else hashlib.sha1(b"blob %d\0" % size)
    with open(full, "rb") as stream:
        for chunk in iter(lambda: stream.read(16 << 20), b""):
            digest.update(chunk)  # hashlib releases the GIL: files hash in parallel
    return digest.hexdigest()


def verify(local: str, expected: dict, says: str = "expected") -> tuple[list[str], dict[str, str]]:
    """(problems, sha256 of every file that passed); wrong content is removed for a re-fetch."""
    problems, present = [], []
    for path, (size, sha256, git_oid) in sorted(expected.items()):
        full = os.path.join(local, path)
        if not os.path.isfile(full):
            problems.append(f"missing {path}")
        elif os.path.getsize(full) != size:
            problems.append(f"size of {path}: {os.path.getsize(full)} bytes, {says} {size}")
        else:
            present.append((path, size, sha256, git_oid))

    def check(item):
        path, size, sha256, git_oid = item
        full = os.path.join(local, path)
        want, kind = (sha256, "sha256") if sha256 else (git_oid, "git sha1")
        got = _digest(full, size, sha256=bool(sha256)) if want else None
        if want and got != want:
            for stale in (full, os.path.join(local, ".cache", "huggingface", "download", path + ".metadata")):
                if os.path.exists(stale):
                    os.remove(stale)
            return path, None, f"content of {path}: {kind} {got}, {says} {want} (removed, fetched again next)"
        return path, (sha256 if sha256 else _digest(full, size, sha256=True)), None

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(VERIFY_THREADS, os.cpu_count() or 4)) as pool:
        results = list(pool.map(check, present))
    problems += [problem for _, _, problem in results if problem]
    hashes = {path: digest for path, digest, problem in results if not problem}
    return problems, hashes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("verify", "manifest"):
        command = sub.add_parser(name)
        command.add_argument("--dir", required=True)
        command.add_argument("--hub", nargs=2, metavar=("REPO", "REVISION"))
        if name == "verify":
            command.add_argument("--manifest")
            command.add_argument("--manifest-sha256", help="the digest the release pins (required with --manifest)")
        else:
            command.add_argument("--out", required=True)
            command.set_defaults(manifest=None)
    args = parser.parse_args()
    if args.command == "manifest" and not args.hub:
        parser.error("manifest needs --hub REPO REVISION: the Hub says what the files must be")
    if args.command == "verify" and bool(args.hub) == bool(args.manifest):
        parser.error("verify needs exactly one of --hub or --manifest")
    if args.command == "verify" and args.manifest and args.manifest_sha256 is None:
        parser.error("verify --manifest needs --manifest-sha256: a manifest is trusted only through the release's pin")

    expected = manifest_tree(args.manifest, args.manifest_sha256) if args.manifest else hub_tree(*args.hub)
    from_manifest = bool(args.manifest)
    problems, hashes = verify(args.dir, expected, says="the manifest says" if from_manifest else "repository says")
    total = sum(size for size, _, _ in expected.values())
    source = "the mirror's manifest" if from_manifest else "the Hub's tree"
    print(f"verify: {len(expected)} files, {total} bytes expected by {source}, contents hashed; "
          f"{len(problems)} problem(s)")
    if problems:
        print("\n".join(problems[:20]))
    if problems or not expected:
        return 1
    if args.command == "manifest":
        repo, revision = args.hub
        document = manifest_document(repo, revision, {p: (expected[p][0], hashes[p]) for p in expected})
        with open(args.out, "w") as out:
            json.dump(document, out, indent=1)
            out.write("\n")
        print(f"manifest: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
