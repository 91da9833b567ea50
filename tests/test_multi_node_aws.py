"""One replica over two p5.48xlarge nodes under Pulumi's mock runtime (issue 22, item 2): the cluster
placement group, every EFA interface, the replica's own security group, each rank's release with
the leader's address, and what a replaced node does to the other rank."""

from __future__ import annotations

import json

import pytest

from kimi_fleet import catalog, node_files
from kimi_fleet.launch import REPLICA_PEERS_ENV, replica_launches
from kimi_fleet.node_files import SecretsSource, render_node_files
from kimi_fleet.rules import check_rules
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import PROJECT_ROOT
from tooling.mock_run import mock_instance_id
from tests.test_aws_stacks import HF_TOKEN, INSTANCE, LT, SG, resolved, run_endpoint, with_capacity

STACK = "h100-int4-vllm"
PLACEMENT = "aws:ec2/placementGroup:PlacementGroup"
EIP_ASSOCIATION = "aws:ec2/eipAssociation:EipAssociation"
BUNDLE = "aws:s3/bucketObjectv2:BucketObjectv2"
ASSOCIATION = "aws:ssm/association:Association"


@pytest.fixture(scope="module")
def run():
    return run_endpoint(resolved(STACK), hf_token=HF_TOKEN)


def _by_rank(resources: list[dict]) -> list[dict]:
    return sorted(resources, key=lambda x: x["name"])


def _bundle_files(bundle: dict) -> dict[str, str]:
    return {entry["path"]: entry["content"] for entry in json.loads(bundle["inputs"]["content"])["files"]}


def test_both_nodes_start_in_one_cluster_placement_group(run):
    (group,) = run.of_type(PLACEMENT)
    assert group["inputs"]["strategy"] == "cluster"
    templates = run.of_type(LT)
    assert len(templates) == 2
    assert {t["inputs"]["placement"]["groupName"] for t in templates} == {group["name"]}
    instances = _by_rank(run.of_type(INSTANCE))
    assert [i["inputs"]["tags"]["Name"] for i in instances] == [f"{STACK}-rank-0", f"{STACK}-rank-1"]
    # On demand: AWS places no spot instance that stops on interruption in a cluster placement group.
    assert all(not t["inputs"].get("instanceMarketOptions") for t in templates)


def test_every_efa_interface_of_the_instance_type_in_aws_layout(run):
    efa = catalog.FABRICS["p5.48xlarge"].interfaces
    for template in run.of_type(LT):
        interfaces = template["inputs"]["networkInterfaces"]
        assert len(interfaces) == efa + 1  # card 0 carries the primary ENA interface too
        layout = [(i["networkCardIndex"], i["deviceIndex"], i.get("interfaceType")) for i in interfaces]
        assert layout[0] == (0, 0, None) and layout[1] == (0, 1, "efa-only")
        assert layout[2:] == [(card, 0, "efa-only") for card in range(1, efa)]
        assert len({i["subnetId"] for i in interfaces}) == 1  # one subnet, one zone
        # The groups live in the interfaces (AWS refuses instance-level groups beside them).
        assert not template["inputs"].get("vpcSecurityGroupIds")
    for instance in run.of_type(INSTANCE):
        assert not instance["inputs"].get("subnetId")


def test_the_replicas_group_lets_its_nodes_talk_and_nothing_else_in(run):
    groups = {g["name"]: g for g in run.of_type(SG)}
    replica = groups["kimi-replica-sg"]
    (ingress,) = replica["inputs"]["ingress"]
    assert ingress["self"] is True and ingress["protocol"] == "-1"
    assert not ingress.get("cidrBlocks") and not ingress.get("ipv6CidrBlocks")
    egress = replica["inputs"]["egress"]
    assert any(rule.get("self") for rule in egress)  # EFA needs the explicit self rule both ways
    public = groups["kimi-network-sg"]
    assert {rule["fromPort"] for rule in public["inputs"]["ingress"]} == {443, 80}
    leader, worker = _by_rank(run.of_type(LT))
    leader_groups = set(leader["inputs"]["networkInterfaces"][0]["securityGroups"])
    worker_groups = set(worker["inputs"]["networkInterfaces"][0]["securityGroups"])
    assert leader_groups == {f"{replica['name']}-id", f"{public['name']}-id"}
    assert worker_groups == {f"{replica['name']}-id"}  # a worker takes no HTTPS from the world


def test_elastic_ips_name_the_primary_interface(run):
    associations = run.of_type(EIP_ASSOCIATION)
    assert len(associations) == 2
    for association in associations:
        assert association["inputs"]["networkInterfaceId"].startswith("eni-")
        assert not association["inputs"].get("instanceId")


def test_each_rank_boots_its_own_release_with_the_leaders_address(run):
    bundles = {}
    for bundle in run.of_type(BUNDLE):
        files = _bundle_files(bundle)
        facts = json.loads(files[f"{node_files.ENV_DIR}/stack.json"])
        bundles[facts["replica"]["rank"]] = (files, facts)
    assert sorted(bundles) == [0, 1]
    argv = {rank: json.loads(files[f"{node_files.ENV_DIR}/engine-0.argv.json"]) for rank, (files, _) in bundles.items()}
    addresses = [argv[0][argv[0].index("--master-addr") + 1], argv[1][argv[1].index("--master-addr") + 1]]
    assert addresses[0] == addresses[1] != "leader.replica.internal"  # both dial the leader's real address
    assert "--headless" in argv[1] and "--headless" not in argv[0]
    assert argv[1][argv[1].index("--node-rank") + 1] == "1"
    host_ip = {rank: next(a for a in args if a.startswith("--env=VLLM_HOST_IP=")) for rank, args in argv.items()}
    assert host_ip[0] == f"--env=VLLM_HOST_IP={addresses[0]}"
    assert host_ip[1] != host_ip[0]
    peers = {rank: next(a for a in args if a.startswith(f"--env={REPLICA_PEERS_ENV}=")) for rank, args in argv.items()}
    assert peers[0] == peers[1]
    assert bundles[0][1]["replica"]["serves_api"] and not bundles[1][1]["replica"]["serves_api"]
    # Each rank names its peer's instance (EC2's id: a peer replaced at the same address is new).
    peer_ids = {rank: [peer["instance_id"] for peer in facts["replica"]["peers"]] for rank, (_, facts) in bundles.items()}
    assert all(len(ids) == 1 and node_files.INSTANCE_ID.fullmatch(ids[0]) for ids in peer_ids.values())
    from components.aws_endpoint import REPLICA_RANK_TAG

    instances = {instance["inputs"]["tags"][REPLICA_RANK_TAG]: mock_instance_id(instance["name"])
                 for instance in run.of_type(INSTANCE)}
    assert peer_ids == {0: [instances["1"]], 1: [instances["0"]]}
    assert "--device=/dev/infiniband" in argv[1]
    # Each rank runs the pinned image with the EFA userspace built in, from the Dockerfile its release carries.
    for rank, (files, facts) in bundles.items():
        image = argv[rank][argv[rank].index("--entrypoint") + 2]
        assert image.startswith("kimi-fleet/engine-efa:")
        (dockerfile,) = [text for path, text in files.items() if path.endswith("/Dockerfile")]
        assert f"/etc/kimi-fleet/images/{image.split(':')[1]}/Dockerfile" in files
        assert "FROM vllm/vllm-openai:v0.22.1\n" in dockerfile and catalog.EFA_INSTALLER.sha256 in dockerfile
        assert f"IMAGE_BUILD_DIR=/etc/kimi-fleet/images/{image.split(':')[1]}" in files["/etc/kimi-fleet/engine-0.env"]


def test_each_rank_has_its_pointer_its_apply_and_its_volume(run):
    pointers = sorted(p["inputs"]["name"] for p in run.of_type("aws:ssm/parameter:Parameter")
                      if p["inputs"]["name"].endswith(("/release", "/release-rank-1")))
    assert pointers == [f"/kimi-fleet/{STACK}/release", f"/kimi-fleet/{STACK}/release-rank-1"]
    applies = run.of_type(ASSOCIATION)
    assert len(applies) == 2
    assert len({a["inputs"]["targets"][0]["values"][0] for a in applies}) == 2
    # Each association waits at least as long as its apply may: a replaced peer's whole cold start.
    from components.node_release import APPLY_MARGIN_SECONDS
    from kimi_fleet.node_files import replica_apply_timeout_seconds
    from kimi_fleet.sizing import size

    r = resolved(STACK)
    for apply in applies:
        assert int(apply["inputs"]["parameters"]["executionTimeout"]) == (
            replica_apply_timeout_seconds(r, size(r)) + APPLY_MARGIN_SECONDS)
    assert len(run.of_type("aws:ebs/volume:Volume")) == 2


def test_the_endpoint_is_the_leaders_and_costs_both_nodes(run):
    assert run.outputs["public_address"]
    offer = catalog.MACHINE_OFFERS["p5.48xlarge"]
    assert run.outputs["hourly_cost_usd"] >= 2 * offer.on_demand_usd_per_hour


def _engine_lines(r, rank: int, addresses: tuple[str, ...]) -> str:
    launch = replica_launches(r, addresses)[rank]
    files = render_node_files(r, launch, size(r), secrets=SecretsSource("files"), node_rank=rank,
                              ebs_volume_id="vol-0123456789abcdef0")
    return files[launch.instances[0].argv_file_path].content


@pytest.mark.parametrize("replaced", [0, 1])
def test_a_replaced_node_restarts_every_rank_into_the_new_rendezvous(replaced):
    """A TP/PP group cannot re-admit one rank: whichever node AWS replaces (a new private address),
    every rank's engine line changes, so each rank's apply restarts its engine on the same update."""
    r = resolved(STACK)
    before = ("10.0.1.10", "10.0.1.11")
    after = tuple("10.0.1.99" if rank == replaced else address for rank, address in enumerate(before))
    for rank in range(2):
        assert _engine_lines(r, rank, before) != _engine_lines(r, rank, after)


def test_spot_is_refused_for_a_multi_node_replica():
    problems, _ = check_rules(with_capacity(resolved(STACK), market="spot"))
    assert any("capacity.market" in p and "placement group" in p for p in problems)


def test_ranks_of_different_releases_never_meet():
    """One rank rolled back while the other took the new release (or a change only one took): the
    two dial different rendezvous ports, so no replica runs two configurations; the ranks of one
    release always dial the same one."""
    r = resolved(STACK)
    addresses = ("10.0.1.10", "10.0.1.11")

    def ports(stack):
        return {args[args.index("--master-port") + 1] for launch in replica_launches(stack, addresses)
                for args in [list(launch.instances[0].argv)]}

    (port,) = ports(r)
    engine = r.spec.engine.model_copy(update={"extra_args": ("--max-num-seqs", "64")})
    (other,) = ports(type(r)(r.spec.model_copy(update={"engine": engine})))
    assert port != other
    assert int(catalog.MULTI_NODE["vllm"].rendezvous_port) <= int(port) < 29501 + 200


def test_the_efa_image_recipe_checks_the_installer_and_runs_clean_under_shellcheck(tmp_path):
    """The Dockerfile's one RUN script, as bash runs it (SHELL bash -o pipefail): shellcheck-clean,
    refusing the installer unless its SHA-256 is the pinned one, userspace only."""
    import shutil
    import subprocess

    from kimi_fleet.launch import efa_image_build

    build = efa_image_build("vllm/vllm-openai:v0.22.1")
    lines = build.dockerfile.splitlines()
    assert lines.count("FROM vllm/vllm-openai:v0.22.1") == 1
    assert 'SHELL ["/bin/bash", "-o", "pipefail", "-c"]' in lines
    start = next(i for i, line in enumerate(lines) if line.startswith("RUN "))
    script = []
    for line in lines[start:]:
        script.append(line.removeprefix("RUN ").rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    body = "\n".join(script)
    assert f'echo "{catalog.EFA_INSTALLER.sha256}  /tmp/efa-installer.tar.gz" | sha256sum -c -' in body
    assert "--skip-kmod" in body and catalog.EFA_INSTALLER.url in body
    assert build.tag == f"kimi-fleet/engine-efa:{build.digest[:16]}"
    if shutil.which("shellcheck"):
        path = tmp_path / "run.sh"
        path.write_text("#!/bin/bash\nset -o pipefail\n" + body.replace(";", ";\n") + "\n")
        checked = subprocess.run(["shellcheck", "-s", "bash", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout
    # Another installer or base is another image: never a stale one reused under the same tag.
    assert efa_image_build("vllm/vllm-openai:v0.22.0").tag != build.tag


def test_a_release_builds_its_efa_image_from_the_staged_dockerfile_never_pulls_it(tmp_path, monkeypatch):
    """Before the swap, while the old engines serve: the applier builds the rank's EFA image from the
    Dockerfile the staged release carries (a local tag cannot be pulled), and pulls a pinned one."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "apply_release", PROJECT_ROOT / "kimi_fleet/node_scripts/apply_release.py")
    applier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(applier)
    r = resolved(STACK)
    launch = replica_launches(r, ("10.0.1.10", "10.0.1.11"))[1]
    staged = tmp_path / "staged"
    for file in render_node_files(r, launch, size(r), secrets=SecretsSource("files"), node_rank=1,
                                  ebs_volume_id="vol-0123456789abcdef0").values():
        target = staged / file.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(file.content)
    ((image, build_dir),) = applier.engine_images(staged)
    assert image == launch.image and build_dir == launch.build.context_dir
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "docker").write_text(f"#!/bin/bash\necho \"$@\" >>{tmp_path / 'docker.log'}\n"
                                  "[ \"$1\" != image ]\n")  # nothing on the node yet
    (tools / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    applier.ensure_image(staged, image, build_dir)
    applier.ensure_image(staged, "vllm/vllm-openai:v0.22.1", "")
    calls = (tmp_path / "docker.log").read_text().splitlines()
    assert calls == [f"image inspect {image}", f"build --tag {image} {staged}{build_dir}",
                     "image inspect vllm/vllm-openai:v0.22.1", "pull vllm/vllm-openai:v0.22.1"]
    assert (staged / build_dir.lstrip("/") / "Dockerfile").read_text() == launch.build.dockerfile
