"""The managed weights mirror (weights.mirror: managed): what a stack's mirror is, what filling it
takes and costs, the fill instance's user data, and the pairing of stacks that share a bucket.

One S3 bucket per region holds `<prefix>/<repo>/<revision>/` for every checkpoint the region's stacks
pin. Exactly one stack creates the bucket (`mirrorBucket: create`); others adopt it by name. Each
stack declares a fill for its (repo, revision): a one-shot CPU instance that downloads from the Hub,
verifies against the Hub's tree, uploads, writes the manifest last and powers itself off. A fill
that finds the manifest already there exits at once, so stacks pinning the same checkpoint share it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import yaml

from kimi_fleet import catalog, templates
from kimi_fleet.launch import plain_value
from kimi_fleet.node_files import FETCH_REQUIREMENTS, HF_CLI_REQUIREMENTS, node_script
from kimi_fleet.node_scripts.weights_manifest import FILL_FAILED_NAME, MANIFEST_NAME
from kimi_fleet.paths import mirror_compile_cache_prefix
from kimi_fleet.resolve import Resolved
from kimi_fleet.spec import StackSpec

#: Where the fill's files land on its instance.
FILL_DIR = "/opt/kimi-fleet-fill"
#: The fill's deadline, as a multiple of its expected time: it powers off then, done or not.
FILL_DEADLINE_FACTOR = 3
#: The line of scripts/await_mirror.py (and scripts/pin_mirror_manifest.py) that carries the
#: mirror manifest's SHA-256 once the deployer checked it against the Hub: the value nodes pin.
MANIFEST_SHA256_PREFIX = "mirror: manifest sha256: "


def manifest_sha256_from(stdout: str | None) -> str:
    """The digest the deployer-side command printed; refused when it printed none (no node may get
    weights from a manifest nobody pinned)."""
    lines = [line for line in (stdout or "").splitlines() if line.startswith(MANIFEST_SHA256_PREFIX)]
    digest = lines[-1].removeprefix(MANIFEST_SHA256_PREFIX).strip() if lines else ""
    if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise ValueError(f"the mirror command printed no manifest digest ({MANIFEST_SHA256_PREFIX.strip()} ...): "
                         "the mirror's manifest was not verified against the Hub")
    return digest


@dataclass(frozen=True)
class MirrorPlan:
    bucket: str
    #: the key prefix inside the bucket ("" for the bucket's root)
    prefix: str
    repo: str
    revision: str
    region: str
    create_bucket: bool
    checkpoint_bytes: int
    setup_seconds: int
    download_seconds: int
    verify_seconds: int
    upload_seconds: int

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    @property
    def checkpoint_prefix(self) -> str:
        """The key prefix of this checkpoint's files."""
        return "/".join(p for p in (self.prefix, self.repo, self.revision) if p)

    @property
    def compile_cache_prefix(self) -> str:
        """The key prefix under which nodes share their engines' compile caches."""
        return mirror_compile_cache_prefix(self.prefix)

    @property
    def manifest_key(self) -> str:
        return f"{self.checkpoint_prefix}/{MANIFEST_NAME}"

    @property
    def failure_key(self) -> str:
        return f"{self.checkpoint_prefix}/{FILL_FAILED_NAME}"

    @property
    def fill_id(self) -> str:
        """Names the fill's resources: a new checkpoint (or mirror) is a new fill."""
        return hashlib.sha256(f"{self.uri}/{self.repo}@{self.revision}".encode()).hexdigest()[:8]

    @property
    def fill_seconds(self) -> int:
        return self.setup_seconds + self.download_seconds + self.verify_seconds + self.upload_seconds

    @property
    def deadline_minutes(self) -> int:
        return math.ceil(self.fill_seconds * FILL_DEADLINE_FACTOR / 60)

    @property
    def fill_usd(self) -> float:
        """One fill, once per (repo, revision) and region: the instance's hours."""
        return round(self.fill_seconds / 3600 * catalog.FILL_INSTANCE.on_demand_usd_per_hour, 2)

    @property
    def monthly_storage_usd(self) -> float:
        return round(self.checkpoint_bytes / catalog.GB * catalog.S3_STANDARD_USD_PER_GB_MONTH, 2)

    def describe(self) -> list[str]:
        minutes = lambda seconds: f"{seconds / 60:.0f} min"  # noqa: E731
        return [
            f"{self.uri} ({'created by this stack' if self.create_bucket else 'adopted: another stack creates it'})",
            f"fill of {self.repo}@{self.revision[:12]}, once per region: {catalog.FILL_INSTANCE.instance_type} "
            f"on demand, about {minutes(self.fill_seconds)} (setup {minutes(self.setup_seconds)}, Hub download "
            f"{minutes(self.download_seconds)}, verify {minutes(self.verify_seconds)}, upload "
            f"{minutes(self.upload_seconds)}), ${self.fill_usd:.2f} one time; powers off by "
            f"{self.deadline_minutes} min whatever happens",
            f"storage of this checkpoint ${self.monthly_storage_usd:.2f}/month (S3 Standard); a fill that finds the manifest "
            "exits at once (stacks pinning the same checkpoint share it)",
        ]


def plan_mirror(r: Resolved) -> MirrorPlan | None:
    weights = r.spec.weights
    if weights.mirror != "managed":
        return None
    bucket, prefix = weights.s3_mirror_location
    fill = catalog.FILL_INSTANCE
    size = r.checkpoint.size_bytes
    hub = min(catalog.TRANSFER_SOURCES["huggingface"].bytes_per_second, fill.network_bytes_per_second)
    # Verification reads every byte back from the instance's NVMe (hashing on 32 cores is faster).
    verify = math.ceil(size / catalog.NVME_DISK_READ_BYTES_PER_SECOND)
    return MirrorPlan(
        bucket=bucket, prefix=prefix, repo=r.repo, revision=r.revision,
        region=r.spec.target.aws.region, create_bucket=weights.mirror_bucket == "create",
        checkpoint_bytes=size, setup_seconds=catalog.FILL_SETUP_SECONDS,
        download_seconds=math.ceil(size / hub), verify_seconds=verify,
        upload_seconds=math.ceil(size / fill.network_bytes_per_second))


def render_fill_user_data(plan: MirrorPlan) -> str:
    """The fill instance's cloud-config: the fill scripts, the pinned tools, one run, power off."""
    values = {"REPO": plan.repo, "REVISION": plan.revision, "MIRROR": plan.uri, "REGION": plan.region,
              "FAILURE_URI": f"s3://{plan.bucket}/{plan.failure_key}"}
    script = templates.render(
        "fill_instance.sh", FILL_DIR=FILL_DIR, DEADLINE_MINUTES=plan.deadline_minutes,
        **{key: plain_value(key, value) for key, value in values.items()})
    files = [
        {"path": f"{FILL_DIR}/fill_mirror.py", "permissions": "0644", "content": node_script("fill_mirror.py")},
        {"path": f"{FILL_DIR}/weights_manifest.py", "permissions": "0644",
         "content": node_script("weights_manifest.py")},
        {"path": f"{FILL_DIR}/fetch-requirements.txt", "permissions": "0644", "content": FETCH_REQUIREMENTS},
        {"path": f"{FILL_DIR}/hf-requirements.txt", "permissions": "0644", "content": HF_CLI_REQUIREMENTS},
        {"path": f"{FILL_DIR}/fill.sh", "permissions": "0755", "content": script},
    ]
    document = {"write_files": files, "runcmd": [[f"{FILL_DIR}/fill.sh"]]}
    return "#cloud-config\n" + yaml.safe_dump(document, sort_keys=False, width=1000)


def shared_mirror_problems(specs: Iterable[StackSpec]) -> list[str]:
    """Stacks that share a bucket agree: one creates it, the others adopt it, all in one region."""
    by_bucket: dict[str, list[StackSpec]] = {}
    for spec in specs:
        if spec.weights.mirror == "managed":
            by_bucket.setdefault(spec.weights.s3_mirror_location[0], []).append(spec)
    problems = []
    for bucket, sharing in sorted(by_bucket.items()):
        creators = sorted(s.stack for s in sharing if s.weights.mirror_bucket == "create")
        regions = sorted({s.target.aws.region for s in sharing if s.target.aws})
        if len(creators) > 1:
            problems.append(f"mirror bucket {bucket}: created by {', '.join(creators)}; exactly one stack "
                            "creates it (weights.mirrorBucket: create), the others adopt it")
        if not creators:
            problems.append(f"mirror bucket {bucket}: adopted by {', '.join(s.stack for s in sharing)} but no "
                            "stack creates it (weights.mirrorBucket: create)")
        if len(regions) > 1:
            problems.append(f"mirror bucket {bucket}: used from regions {', '.join(regions)}; a mirror serves "
                            "its own region (cross-region reads are slow and billed)")
    return problems
