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
    weights_manifest.py stage-files --dir D --hub REPO REVISION STAGE...
                                                                # one pipeline stage's shards, a line each
                                                                # (the index in D checked against the Hub)

STAGE: --stage I --stages N --first-layer A --end-layer B (integers; layers A..B-1). With it, verify
checks the checkpoint's small files (everything but *.safetensors) and only the shards that stage
loads, picked by tensor name from the checkpoint's own model.safetensors.index.json (stage_files),
and removes any other shard the index lists (vLLM's loader would read it: see stage_files), unless
--keep-other-shards (the directory a running engine serves: never pruned under it).

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


#: The checkpoint's map of tensor name -> shard (vLLM 0.22.1 default_loader.py:116 SAFE_WEIGHTS_INDEX_NAME).
INDEX_NAME = "model.safetensors.index.json"
#: A shard or small file path: relative, no `..`, no shell or wildcard characters.
SAFE_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*(/[A-Za-z0-9_][A-Za-z0-9._+-]*)*")
#: Tensor names by the pipeline stage that loads them, as vLLM 0.22.1 builds Kimi-K2.5/K2.6
#: (KimiK25ForConditionalGeneration): the language model is DeepseekV2ForCausalLM under
#: `language_model.` (models/kimi_k25.py:360-366), whose decoder layers exist only in their stage's
#: range (models/utils.py:617-649 make_layers, PPMissingLayer elsewhere), the embedding only on the
#: first stage and the final norm and lm_head only on the last (models/deepseek_v2.py:1229-1251,
#: 1635-1643); their weights on other stages are skipped (is_pp_missing_parameter, models/utils.py:674).
#: `language_model.layers.` is the legacy NVFP4 spelling the model maps (kimi_k25.py:296-304).
LAYER_TENSOR = re.compile(r"(?:language_model\.)?(?:model\.)?layers\.(\d+)\.")
FIRST_STAGE_TENSOR = re.compile(r"(?:language_model\.)?(?:model\.)?embed_tokens\.")
FINAL_NORM_TENSOR = re.compile(r"(?:language_model\.)?(?:model\.)?norm\.")
LM_HEAD_TENSOR = re.compile(r"(?:language_model\.)?lm_head\.")
LAST_STAGE_TENSOR = re.compile(f"{FINAL_NORM_TENSOR.pattern}|{LM_HEAD_TENSOR.pattern}")
#: Up to this many stages and layers: what a stack can ask for stays a small integer.
MAX_STAGES, MAX_LAYERS = 64, 4096


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


class Stage:
    """One pipeline stage of a multi-node replica: its index of `stages`, and layers first..end-1."""

    def __init__(self, index: int, stages: int, first_layer: int, end_layer: int):
        if not (0 <= index < stages <= MAX_STAGES and 0 <= first_layer < end_layer <= MAX_LAYERS):
            raise ValueError(f"stage {index} of {stages}, layers {first_layer}..{end_layer - 1}: not a stage")
        self.index, self.stages, self.first_layer, self.end_layer = index, stages, first_layer, end_layer

    @property
    def marker(self) -> str:
        """What the verified marker records after the revision: a node whose stage changed fetches again."""
        return f"stage {self.index}/{self.stages} layers {self.first_layer}-{self.end_layer - 1}"

    def loads(self, tensor: str) -> bool:
        layer = LAYER_TENSOR.match(tensor)
        if layer:  # a layer beyond the model's last (an MTP layer) is in no stage's range: no stage loads it
            return self.first_layer <= int(layer.group(1)) < self.end_layer
        if FIRST_STAGE_TENSOR.match(tensor):
            return self.index == 0
        if LAST_STAGE_TENSOR.match(tensor):
            return self.index == self.stages - 1
        # The vision tower and projector (every stage builds them: kimi_k25.py:336-357 is not
        # pipeline-aware, and every stage's profile run runs the encoder, v1/worker/gpu_model_runner.py:6104;
        # only the first stage runs it on requests, :3385) and any name not recognised: every stage.
        return True


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    for flag in ("--stage", "--stages", "--first-layer", "--end-layer"):
        parser.add_argument(flag, type=int, help="a pipeline stage (all four, or none)")


def stage_from_args(parser: argparse.ArgumentParser, args) -> Stage | None:
    values = (args.stage, args.stages, args.first_layer, args.end_layer)
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        parser.error("--stage, --stages, --first-layer and --end-layer go together")
    try:
        return Stage(*values)
    except ValueError as error:
        parser.error(str(error))


def stage_files(index: dict, stage: Stage) -> set[str]:
    """The shards `stage` loads: every file the index maps one of its tensors to.

    What the absent shards do to vLLM 0.22.1's default loader (load format auto/safetensors, the
    h100 stack's: catalog.LOADERS adopts no other over several nodes): it globs *.safetensors in the
    model directory and keeps those the index lists (model_loader/default_loader.py:176-200,
    weight_utils.py:655-673 filter_duplicate_safetensors_files), so a shard absent from disk is
    never opened; each present file is read whole (weight_utils.py:893-) and other stages' tensors
    dropped by name. Missing tensors fail the load only under the strict check, which is off for
    quantized checkpoints (default_loader.py:401-437) and which counts only parameters the stage has."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{INDEX_NAME} has no weight_map")
    files = set()
    layers, parts = set(), set()  # what the stage's own tensors cover (stage_coverage_problem)
    for tensor, path in weight_map.items():
        if not isinstance(path, str) or not SAFE_PATH.fullmatch(path) or ".." in path.split("/"):
            raise ValueError(f"{INDEX_NAME} maps {tensor!r} to {path!r}: not a plain relative path")
        tensor = str(tensor)
        if stage.loads(tensor):
            files.add(path)
            layer = LAYER_TENSOR.match(tensor)
            if layer:
                layers.add(int(layer.group(1)))
            elif FIRST_STAGE_TENSOR.match(tensor):
                parts.add("the embedding (embed_tokens)")
            elif FINAL_NORM_TENSOR.match(tensor):
                parts.add("the final norm (norm)")
            elif LM_HEAD_TENSOR.match(tensor):
                parts.add("lm_head")
    problem = stage_coverage_problem(stage, layers, parts)
    if problem:
        raise ValueError(problem)
    return files


def stage_coverage_problem(stage: Stage, layers: set[int], parts: set[str]) -> str | None:
    """Why the index's tensors the stage loads cannot be all it needs, or None. vLLM 0.22.1 checks
    that every weight was loaded only for a model that is not quantized (default_loader.py:401-437):
    for K2.6 INT4 a tensor the classifier put on no stage, or on the wrong one, would be a silently
    uninitialised weight, not a failed load. So every layer of the stage must have at least one
    tensor, the first stage the embedding, the last the final norm and lm_head (the same name rules
    as Stage.loads)."""
    missing = [f"layer {layer}" for layer in range(stage.first_layer, stage.end_layer) if layer not in layers]
    if len(missing) > 8:
        missing = missing[:8] + [f"... ({len(missing)} layers in all)"]
    wanted = (["the embedding (embed_tokens)"] if stage.index == 0 else []) + \
        (["the final norm (norm)", "lm_head"] if stage.index == stage.stages - 1 else [])
    missing += [part for part in wanted if part not in parts]
    if not missing:
        return None
    return (f"{INDEX_NAME} maps no tensor of {', '.join(missing)} to {stage.marker}: its tensor names are not "
            "the ones this program knows (LAYER_TENSOR, FIRST_STAGE_TENSOR, FINAL_NORM_TENSOR, LM_HEAD_TENSOR), so "
            "the stage's shards cannot be picked safely (a quantized model's missing weight is not a failed load); "
            "refused")


def stage_subset(local: str, expected: dict, stage: Stage, says: str) -> tuple[dict, list[str]]:
    """(what `stage` needs of `expected`, problems): every small file, and the stage's shards. The
    index is checked against `expected` before it is read; a shard it lists that `expected` does
    not is a problem."""
    if INDEX_NAME not in expected:
        return {}, [f"no {INDEX_NAME} in the checkpoint: a stage's files cannot be told apart"]
    problems, _ = verify(local, {INDEX_NAME: expected[INDEX_NAME]}, says)
    if problems:
        return {}, problems
    try:
        with open(os.path.join(local, INDEX_NAME)) as stream:
            wanted = stage_files(json.load(stream), stage)
    except ValueError as error:
        return {}, [str(error)]
    unknown = sorted(wanted - set(expected))
    if unknown:
        return {}, [f"{INDEX_NAME} maps tensors to {path}, which the checkpoint does not hold" for path in unknown]
    return {path: entry for path, entry in expected.items()
            if not path.endswith(".safetensors") or path in wanted}, []


def remove_other_shards(local: str, expected: dict, needed: dict) -> list[str]:
    """Delete listed shards outside the stage (another stage's, from before a re-layout): vLLM's
    loader would read every listed shard present (stage_files)."""
    removed = []
    for path in sorted(set(expected) - set(needed)):
        full = os.path.join(local, path)
        if path.endswith(".safetensors") and os.path.isfile(full):
            os.remove(full)
            removed.append(path)
    return removed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("verify", "manifest", "stage-files"):
        command = sub.add_parser(name)
        command.add_argument("--dir", required=True)
        command.add_argument("--hub", nargs=2, metavar=("REPO", "REVISION"))
        if name != "manifest":
            command.add_argument("--manifest")
            command.add_argument("--manifest-sha256", help="the digest the release pins (required with --manifest)")
            add_stage_arguments(command)
            if name == "verify":
                command.add_argument("--keep-other-shards", action="store_true",
                                     help="with a stage: remove no other shard (the directory is being served)")
        else:
            command.add_argument("--out", required=True)
            command.set_defaults(manifest=None)
    args = parser.parse_args()
    if args.command == "manifest" and not args.hub:
        parser.error("manifest needs --hub REPO REVISION: the Hub says what the files must be")
    if args.command != "manifest" and bool(args.hub) == bool(args.manifest):
        parser.error(f"{args.command} needs exactly one of --hub or --manifest")
    if args.command != "manifest" and args.manifest and args.manifest_sha256 is None:
        parser.error("verify --manifest needs --manifest-sha256: a manifest is trusted only through the release's pin")
    stage = stage_from_args(parser, args) if args.command != "manifest" else None
    if args.command == "stage-files" and stage is None:
        parser.error("stage-files needs a stage")

    expected = manifest_tree(args.manifest, args.manifest_sha256) if args.manifest else hub_tree(*args.hub)
    from_manifest = bool(args.manifest)
    says = "the manifest says" if from_manifest else "repository says"
    whole = len(expected)
    if stage is not None:
        needed, problems = stage_subset(args.dir, expected, stage, says)
        if problems:
            print(f"{args.command}: {stage.marker}: " + "; ".join(problems[:20]), file=sys.stderr)
            return 1
        if args.command == "stage-files":  # the Hub path's download list: SAFE_PATH names, a line each
            print("\n".join(sorted(p for p in needed if p.endswith(".safetensors"))))
            return 0
        # A directory a running engine serves (an in-place release) keeps every shard: a superset
        # loads, only slower; only a directory nothing serves from is pruned.
        removed = [] if args.keep_other_shards else remove_other_shards(args.dir, expected, needed)
        print(f"verify: {stage.marker}: {len(needed)} of {whole} files, "
              f"{sum(s for s, _, _ in needed.values())} of {sum(s for s, _, _ in expected.values())} bytes"
              + (f"; removed {len(removed)} other stage(s)' shard(s)" if removed else ""))
        expected = needed
    problems, hashes = verify(args.dir, expected, says=says)
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
