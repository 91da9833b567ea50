"""The rendered Kubernetes objects: schema-valid for a current release, and the properties that matter."""

import copy
import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kimi_fleet import catalog
from kimi_fleet import k8s_manifests as manifests
from kimi_fleet.launch import render_launch
from kimi_fleet.node_scripts import node_script
from kimi_fleet.node_scripts.generation_probe import ALIVE_WHILE_GENERATING, METRICS_TIMEOUT_SECONDS
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.spec import image_is_pinned
from kimi_fleet.validation import parse_spec
from kimi_fleet.stackfile import load_stack_config, stack_file

K8S_STACKS = ["gb200-int4-vllm", "mi355x-int4-sglang"]
# Newest schemas kubernetes-validate ships; resource.k8s.io/v1 (DRA GA) is in them.
K8S_VERSION = kubernetes_validate.latest_version()


def rendered(stack: str, **overrides):
    values = copy.deepcopy(load_stack_config(stack_file(stack)).values)
    values.update(overrides)
    r = Resolved(parse_spec(values, stack, f"stacks/Pulumi.{stack}.yaml"))
    sizing = size(r)
    return r, sizing, manifests.render_manifests(r, sizing, render_launch(r), stack=stack)


def of_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def containers(deployment, name):
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def test_schema_release_is_current():
    assert tuple(map(int, K8S_VERSION.split("."))) >= (1, 34)


@pytest.mark.parametrize("stack", K8S_STACKS)
def test_every_object_validates_strictly(stack):
    _, _, objects = rendered(stack)
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_gb200_claims_four_gpus_through_dra():
    _, _, objects = rendered("gb200-int4-vllm")
    (template,) = of_kind(objects, "ResourceClaimTemplate")
    assert template["apiVersion"] == "resource.k8s.io/v1"
    (request,) = template["spec"]["spec"]["devices"]["requests"]
    assert request["exactly"] == {"deviceClassName": "gpu.nvidia.com", "allocationMode": "ExactCount", "count": 4}
    (deployment,) = of_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["resourceClaims"] == [{"name": request["name"], "resourceClaimTemplateName": template["metadata"]["name"]}]
    engine = containers(deployment, "engine")
    assert engine["resources"]["claims"] == [{"name": request["name"]}]
    assert "nvidia.com/gpu" not in engine["resources"]["limits"]


def test_mi355x_takes_four_amd_gpus_per_pod():
    r, _, objects = rendered("mi355x-int4-sglang")
    assert not of_kind(objects, "ResourceClaimTemplate")
    (deployment,) = of_kind(objects, "Deployment")
    # The stack scales (2-6): KEDA's HPA owns the count, the Deployment names none.
    assert "replicas" not in deployment["spec"] and r.spec.capacity.replicas == 2
    engine = containers(deployment, "engine")
    assert engine["resources"]["limits"]["amd.com/gpu"] == "4"
    assert {"name": "HIP_VISIBLE_DEVICES", "value": "0,1,2,3"} in engine["env"]
    assert engine["securityContext"]["seccompProfile"] == {"type": "Unconfined"}


@pytest.mark.parametrize("stack", K8S_STACKS)
def test_shared_memory_is_a_memory_backed_volume(stack):
    _, _, objects = rendered(stack)
    for deployment in of_kind(objects, "Deployment"):
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in containers(deployment, "engine")["volumeMounts"]}
        shm = volumes[mounts["/dev/shm"]]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert shm["emptyDir"]["sizeLimit"] == "64Gi"


@pytest.mark.parametrize("stack", K8S_STACKS)
def test_every_probe_is_a_real_generation_within_the_sizing_window(stack):
    r, sizing, objects = rendered(stack)
    (probe_map,) = [c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == manifests.PROBE_CONFIGMAP]
    assert probe_map["data"]["generation_probe.py"] == node_script("generation_probe.py")
    for deployment in of_kind(objects, "Deployment"):
        engine = containers(deployment, "engine")
        startup, readiness, liveness = engine["startupProbe"], engine["readinessProbe"], engine["livenessProbe"]
        for probe in (startup, readiness, liveness):
            command = probe["exec"]["command"]
            assert command[:2] == ["python3", f"{manifests.PROBE_MOUNT}/generation_probe.py"]
            metrics_reads = 0
            if probe is liveness:
                # Liveness passes a busy engine (its token counter advanced): the engine's own metric names.
                assert command[2] == ALIVE_WHILE_GENERATING
                assert json.loads(command[3]) == r.adapter.load_metrics.as_dict()
                command = command[:2] + command[4:]
                metrics_reads = 2  # /metrics before and after the generation
            else:
                # Readiness and startup take a pod that does not generate out, busy or not.
                assert ALIVE_WHILE_GENERATING not in command
            assert command[2:4] == [f"http://127.0.0.1:{r.engine.port}", r.spec.model.served_name]
            # The probe gives up (its generation and /metrics reads) before kubelet kills it.
            assert float(command[4]) + metrics_reads * METRICS_TIMEOUT_SECONDS < probe["timeoutSeconds"]
        assert liveness["failureThreshold"] * liveness["periodSeconds"] >= 120
        mounts = {m["mountPath"]: m["name"] for m in engine["volumeMounts"]}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes[mounts[manifests.PROBE_MOUNT]]["configMap"]["name"] == manifests.PROBE_CONFIGMAP


HOST_PATH_WEIGHTS = {"weights": {"volume": "host-path", "hostPath": "/raid/models"}}


@pytest.mark.parametrize("stack, overrides", [(s, {}) for s in K8S_STACKS] + [("gb200-int4-vllm", HOST_PATH_WEIGHTS)])
def test_the_startup_window_is_sized_from_the_cold_read_and_a_load_that_never_finishes_is_killed(stack, overrides):
    """Issue 20: a new pod reads the weights from the volume cold (the plan's "from its volume"
    time: read + load, ~751 s here) and was killed at 410 s, the warm restart's window; a hung load
    must still be killed, well before twice that."""
    from kimi_fleet.node_files import ADMISSION_DEADLINE_SECONDS

    _, sizing, objects = rendered(stack, **overrides)
    cold = sizing.read_seconds + sizing.load_seconds
    assert cold == sizing.volume_start_seconds > sizing.warm_start_seconds
    for deployment in of_kind(objects, "Deployment"):
        startup = containers(deployment, "engine")["startupProbe"]
        period, threshold = startup["periodSeconds"], startup["failureThreshold"]
        window = threshold * period + startup.get("initialDelaySeconds", 0)
        assert cold <= window < 2 * cold, (cold, window)
        # The kubelet runs one probe at a time: against an engine that accepts and never answers each
        # runs to its timeout, and the first may wait a period. Even then the kill comes before 2x.
        hung = startup.get("initialDelaySeconds", 0) + period + threshold * max(period, startup["timeoutSeconds"])
        assert hung < 2 * cold, (cold, hung)
        # A loading engine, then its admission run, must not be reported as a failed rollout.
        assert deployment["spec"]["progressDeadlineSeconds"] > window + ADMISSION_DEADLINE_SECONDS
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("stack", K8S_STACKS)
def test_each_engine_pod_carries_only_its_own_engines_cache_variables(stack):
    """Issue 21: the vLLM stack's pods were given SGLANG_DG_CACHE_DIR, which vLLM never reads. The
    pods take the node launch's environment (one source), and a variable named for another
    engine is not in it."""
    from kimi_fleet import engines
    from kimi_fleet.launch import COMPILE_CACHE_MOUNT

    r, _, objects = rendered(stack)
    own = r.spec.engine.name
    others = [f"{name.upper()}_" for name in engines.names() if name != own]
    assert others
    (instance,) = render_launch(r).instances
    for deployment in of_kind(objects, "Deployment"):
        env = {e["name"]: e.get("value") for e in containers(deployment, "engine")["env"]}
        assert env == instance.env
        caches = {key for key, value in env.items() if value and value.startswith(COMPILE_CACHE_MOUNT)}
        assert any(key.startswith(f"{own.upper()}_") for key in caches), caches  # its own cache root
        assert not [key for key in env if key.startswith(tuple(others))], env


@pytest.mark.parametrize("stack", K8S_STACKS)
def test_only_the_proxy_is_exposed(stack):
    r, _, objects = rendered(stack)
    (service,) = of_kind(objects, "Service")
    assert sorted(p["port"] for p in service["spec"]["ports"]) == [80, 443]
    assert r.engine.port not in [p["port"] for p in service["spec"]["ports"]]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"https", "http"}
    for deployment in of_kind(objects, "Deployment"):
        engine = containers(deployment, "engine")
        assert "ports" not in engine
        assert "--host" in engine["args"] and engine["args"][engine["args"].index("--host") + 1] == "127.0.0.1"
        proxy_ports = {p["name"]: p["containerPort"] for p in containers(deployment, "proxy")["ports"]}
        assert proxy_ports == {"https": 443, "http": 80}


@pytest.mark.parametrize("stack", K8S_STACKS)
def test_network_policies_admit_only_the_proxy_ports(stack):
    _, _, objects = rendered(stack)
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(objects, "NetworkPolicy")}
    deny, proxy = policies[manifests.DENY_ALL_POLICY], policies[manifests.PROXY_POLICY]
    # Every pod of the namespace (weights Job included): no ingress at all...
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    # ...except the engine pods' proxy ports, from anywhere.
    assert proxy["policyTypes"] == ["Ingress"] and len(proxy["ingress"]) == 1
    (rule,) = proxy["ingress"]
    assert "from" not in rule
    admitted = {(p["port"], p["protocol"]) for p in rule["ports"]}
    assert admitted == {("https", "TCP"), ("http", "TCP")}
    selector = proxy["podSelector"]["matchLabels"]
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        # The named ports exist on the proxy only: the engine's port is never admitted.
        named = {port["name"]: c["name"] for c in pod["spec"]["containers"] for port in c.get("ports", [])}
        # The proxy's ports, and the metrics gate's (admitted from the monitoring namespace's
        # Prometheus only: tests/test_k8s_observability.py); the engine's port is never named.
        assert named == {"https": "proxy", "http": "proxy", manifests.METRICS_PORT_NAME: "metrics"}
    # Applied before anything that runs a pod.
    kinds = [o["kind"] for o in objects]
    assert max(i for i, k in enumerate(kinds) if k == "NetworkPolicy") < min(
        i for i, k in enumerate(kinds) if k in ("Job", "Deployment"))


@pytest.mark.parametrize("service_type, policy", [("LoadBalancer", "Local"), ("NodePort", "Local"), ("ClusterIP", None)])
def test_the_proxy_sees_client_addresses(service_type, policy):
    target = copy.deepcopy(load_stack_config(stack_file("gb200-int4-vllm")).values["target"])
    target["kubernetes"]["proxyServiceType"] = service_type
    _, _, objects = rendered("gb200-int4-vllm", target=target)
    (service,) = of_kind(objects, "Service")
    assert service["spec"].get("externalTrafficPolicy") == policy
    kubernetes_validate.validate(service, K8S_VERSION, strict=True)


def test_caddy_sidecar_uses_the_shared_caddyfile():
    r, _, objects = rendered("gb200-int4-vllm")
    (config_map,) = [c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == manifests.CADDYFILE_CONFIGMAP]
    caddyfile = config_map["data"]["Caddyfile"]
    assert "kimi-gb200.example.com {" in caddyfile
    # (Behind whatever request matcher the shared Caddyfile puts first: the upstream is the engine on loopback.)
    assert re.search(r"^\s*reverse_proxy (@\S+ )?127\.0\.0\.1:8000 \{$", caddyfile, re.M), caddyfile
    assert "tls internal" not in caddyfile  # LoadBalancer: a public ACME certificate


def test_external_dns_annotation_and_internal_tls_off_a_load_balancer():
    target = {"kind": "kubernetes", "kubernetes": {"namespace": "kimi-gb200", "gpuClaim": "dra",
                                                    "storageClass": "local-nvme", "externalDns": True,
                                                    "proxyServiceType": "NodePort"}}
    _, _, objects = rendered("gb200-int4-vllm", target=target)
    (service,) = of_kind(objects, "Service")
    assert service["metadata"]["annotations"] == {"external-dns.alpha.kubernetes.io/hostname": "kimi-gb200.example.com"}
    assert service["spec"]["type"] == "NodePort"
    assert "tls internal" in of_kind(objects, "ConfigMap")[0]["data"]["Caddyfile"]  # the Caddyfile comes first


def scheduling(deployment):
    pod = deployment["spec"]["template"]["spec"]
    return pod["nodeSelector"]["karpenter.sh/capacity-type"], pod["tolerations"]


@pytest.mark.parametrize("stack", K8S_STACKS)
def test_on_demand_stacks_select_on_demand_nodes(stack):
    _, _, objects = rendered(stack)
    for deployment in of_kind(objects, "Deployment"):
        market, tolerations = scheduling(deployment)
        assert market == "on-demand"
        assert {"key": "karpenter.sh/capacity-type", "operator": "Equal", "value": "on-demand",
                "effect": "NoSchedule"} in tolerations


def test_spot_keeps_the_on_demand_base_on_on_demand_nodes():
    _, _, objects = rendered("mi355x-int4-sglang", capacity={"market": "spot", "replicas": 3, "onDemandBase": 1})
    by_market = {scheduling(d)[0]: d for d in of_kind(objects, "Deployment")}
    assert {m: d["spec"]["replicas"] for m, d in by_market.items()} == {"on-demand": 1, "spot": 2}
    spot_tolerations = scheduling(by_market["spot"])[1]
    assert {"key": "karpenter.sh/capacity-type", "operator": "Equal", "value": "spot",
            "effect": "NoSchedule"} in spot_tolerations
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_batch_spot_runs_everything_on_spot_with_the_stack_label():
    target = {"kind": "kubernetes", "kubernetes": {"namespace": "kimi-mi355x", "storageClass": "local-nvme",
                                                    "capacityTypeLabel": "example.com/capacity",
                                                    "nodeSelector": {"example.com/pool": "mi355x"}}}
    _, _, objects = rendered("mi355x-int4-sglang", target=target, capacity={"workload": "batch", "replicas": 2})
    (deployment,) = of_kind(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["nodeSelector"] == {
        "example.com/pool": "mi355x", "example.com/capacity": "spot"}


@pytest.mark.parametrize("stack", K8S_STACKS)
def test_one_weights_volume_written_by_the_job_and_read_only_for_every_replica(stack):
    r, sizing, objects = rendered(stack)
    (pvc,) = of_kind(objects, "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "local-nvme"
    assert int(pvc["spec"]["resources"]["requests"]["storage"].removesuffix("Gi")) * 2**30 > r.checkpoint.size_bytes
    (job,) = of_kind(objects, "Job")
    job_pod = job["spec"]["template"]["spec"]
    assert job_pod["volumes"] == [{"name": "weights", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}},
                                  {"name": "verifier", "configMap": {"name": "kimi-weights-verifier"}}]
    (verifier,) = [c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == "kimi-weights-verifier"]
    assert verifier["data"]["weights_manifest.py"] == node_script("weights_manifest.py")  # the nodes' verifier
    (download,) = job_pod["containers"]
    env = {e["name"]: e.get("value") for e in download["env"]}
    assert env["REPO"] == r.repo and env["REVISION"] == r.revision
    assert 'hf download "$REPO" --revision "$REVISION" --local-dir "$TARGET_DIR"' in download["command"][2]
    # Every file's size and content (SHA-256 / git blob SHA-1) against the Hub's tree, as on nodes.
    assert ('python3 /opt/kimi-fleet/weights_manifest.py verify --dir "$TARGET_DIR" --hub "$REPO" "$REVISION"'
            in download["command"][2])
    assert ".verified" in download["command"][2]
    assert not download["volumeMounts"][0].get("readOnly")
    assert job["spec"]["activeDeadlineSeconds"] >= sizing.download_seconds
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        claims = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [{"name": "weights", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}}]
        mounts = [m for m in containers(deployment, "engine")["volumeMounts"] if m["name"] == "weights"]
        (model,) = [m for m in mounts if m["mountPath"] == "/models/kimi"]
        assert model["readOnly"] is True and model["subPath"] == r.weights_dir_name
        # The only writable part: the engines' compile cache, beside the weights, per image and accelerator.
        (cache,) = [m for m in mounts if m is not model]
        assert not cache.get("readOnly") and cache["subPath"] == f"compile-cache/{r.compile_cache_dir_name}"
        assert "initContainers" not in pod


def test_host_path_weights_fill_each_node_once_from_an_init_container():
    _, _, objects = rendered("gb200-int4-vllm", weights={"volume": "host-path", "hostPath": "/raid/models"})
    assert not of_kind(objects, "PersistentVolumeClaim") and not of_kind(objects, "Job")
    (deployment,) = of_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert {"name": "weights", "hostPath": {"path": "/raid/models", "type": "DirectoryOrCreate"}} in pod["volumes"]
    assert [c["name"] for c in pod["initContainers"]] == ["download-weights"]
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("stack", K8S_STACKS)
def test_secrets_only_by_reference(stack):
    _, _, objects = rendered(stack)
    assert not of_kind(objects, "Secret")
    text = yaml.safe_dump_all(objects)
    assert "Bearer {env.KIMI_API_KEY}" in text
    for deployment in of_kind(objects, "Deployment"):
        env = {e["name"]: e for e in containers(deployment, "proxy")["env"]}
        assert env["KIMI_API_KEY"] == {"name": "KIMI_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": manifests.API_KEY_SECRET, "key": manifests.API_KEY_SECRET_KEY}}}
    for job in of_kind(objects, "Job"):
        (token,) = [e for e in job["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "HF_TOKEN"]
        assert set(token) == {"name", "valueFrom"}


@pytest.mark.parametrize("stack", K8S_STACKS)
def test_images_are_pinned(stack):
    _, _, objects = rendered(stack)
    images = [
        c["image"]
        for o in objects if o["kind"] in ("Deployment", "Job")
        for c in o["spec"]["template"]["spec"]["containers"] + o["spec"]["template"]["spec"].get("initContainers", [])
    ]
    assert images and all(image_is_pinned(i) for i in images)


def _pip_installs(script: str) -> list[str]:
    """The script's pip install commands, each joined onto one line."""
    return [line for line in script.replace("\\\n", " ").splitlines() if "pip install" in line]


@pytest.mark.parametrize("stack, overrides", [(s, {}) for s in K8S_STACKS] + [("gb200-int4-vllm", HOST_PATH_WEIGHTS)])
def test_the_weights_download_installs_only_the_hash_pinned_hf_cli(stack, overrides):
    """Issue 21: the `hf` CLI of the Job (or init container) is the fill instance's hash-pinned closure,
    shipped beside the download's scripts and installed with --require-hashes --no-deps."""
    from kimi_fleet import node_files

    _, _, objects = rendered(stack, **overrides)
    (verifier,) = [c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == manifests.VERIFIER_CONFIGMAP]
    pins = verifier["data"][manifests.HF_CLI_REQUIREMENTS_KEY]
    assert pins == node_files.HF_CLI_REQUIREMENTS
    assert f"huggingface-hub=={catalog.HUGGINGFACE_HUB_VERSION} " in pins
    assert all("--hash=sha256:" in line for line in pins.splitlines())
    (download,) = [c for o in objects if o["kind"] in ("Deployment", "Job")
                   for c in o["spec"]["template"]["spec"].get("initContainers", []) + o["spec"]["template"]["spec"][
                       "containers"] if c["name"] == "download-weights"]
    mounts = {m["name"]: m["mountPath"] for m in download["volumeMounts"]}
    assert mounts["verifier"] == manifests.VERIFIER_MOUNT
    installs = _pip_installs(download["command"][2])
    (hf,) = [line for line in installs if manifests.HF_CLI_REQUIREMENTS_KEY in line]
    assert f"-r {manifests.VERIFIER_MOUNT}/{manifests.HF_CLI_REQUIREMENTS_KEY}" in hf
    for flag in ("--require-hashes", "--no-deps", "--only-binary=:all:"):
        assert flag in hf.split(), flag
    # Nothing else installs a package by name (the suite's pins go to the weights volume, not hf's).
    assert len(installs) == 2 and all(" -r " in line for line in installs)
    assert "huggingface" not in download["command"][2].replace(manifests.HF_CLI_REQUIREMENTS_KEY, "")


def test_the_download_image_runs_the_python_the_hf_pins_are_for(monkeypatch):
    """The pins hold cp312 wheels (pyyaml): another Python in the download image would fail inside
    the Job at deploy time. The image's tag says its Python, and the render refuses a mismatch."""
    from kimi_fleet import node_files

    assert manifests.image_python(catalog.DOWNLOAD_IMAGE) == node_files.HF_CLI_PYTHON == "3.12"
    assert manifests.image_python("docker.io/library/python:3.13.1-slim-bookworm") == "3.13"
    assert manifests.image_python("caddy:2.10.2") is None
    monkeypatch.setattr(catalog, "DOWNLOAD_IMAGE", "python:3.13.1-slim")
    with pytest.raises(ValueError, match=r"download image python:3\.13\.1-slim refused: it runs Python 3\.13, the "
                                         r"hash-pinned hf CLI \(node_files.HF_CLI_PINS\) is for Python 3\.12"):
        rendered("gb200-int4-vllm")


def test_a_replica_spanning_nodes_is_refused_before_anything_is_rendered():
    with pytest.raises(ValueError, match="a node holds 4"):
        rendered("gb200-int4-vllm", acceleratorCount=8)


@pytest.mark.parametrize("stack", K8S_STACKS)
def test_artifacts_are_multi_document_yaml(stack):
    r, sizing, objects = rendered(stack)
    files = manifests.render_k8s_artifacts(r, sizing, render_launch(r))
    documents = list(yaml.safe_load_all(files["kubernetes.yaml"]))
    assert documents == objects
    assert "&id" not in files["kubernetes.yaml"]


@pytest.mark.parametrize("stack", ["gb200-int4-vllm", "mi355x-int4-sglang"])
def test_a_pod_is_ready_only_when_its_admission_container_passed_the_suite(stack):
    """Issue 9: the pod's own run of the project's verification suite, against its proxy's loopback
    listener, gates readiness (a pod is Ready only when every container is)."""
    from kimi_fleet import node_files

    r, sizing, objects = rendered(stack)
    (config_map,) = [c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == manifests.ADMISSION_CONFIGMAP]
    for deployment in of_kind(objects, "Deployment"):
        admission = containers(deployment, "admission")
        assert admission["readinessProbe"]["exec"]["command"] == ["test", "-f", manifests.ADMISSION_PASSED]
        assert admission["image"] == catalog.DOWNLOAD_IMAGE
        assert {"name": "KIMI_API_KEY", "valueFrom": {"secretKeyRef": {"name": manifests.API_KEY_SECRET,
                                                                      "key": manifests.API_KEY_SECRET_KEY}}} \
            in admission["env"]
        volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "admission")
        items = {item["path"]: item["key"] for item in volume["configMap"]["items"]}
        assert set(items.values()) == set(config_map["data"])  # every file mounted, nothing left out
        for module in node_files.VERIFIER_MODULES:  # the suite exactly as nodes get it
            source = (Path(manifests.__file__).parent / module).read_text()
            assert config_map["data"][items[f"suite/kimi_fleet/{module}"]] == source
    config = json.loads(config_map["data"]["admission.json"])
    release = next(iter(of_kind(objects, "Deployment")))["spec"]["template"]["metadata"]["annotations"][
        manifests.RELEASE_ANNOTATION]
    assert config["release"] == release and config["checks"] == node_files.admission_checks(r)
    assert config["local_proxy"] == f"http://127.0.0.1:{manifests.POD_LOCAL_PROXY_PORT}"
    caddyfile = next(c for c in of_kind(objects, "ConfigMap")
                     if c["metadata"]["name"] == manifests.CADDYFILE_CONFIGMAP)["data"]["Caddyfile"]
    assert f"http://127.0.0.1:{manifests.POD_LOCAL_PROXY_PORT} {{" in caddyfile and "bind 127.0.0.1" in caddyfile


@pytest.mark.parametrize("stack, overrides", [(s, {}) for s in K8S_STACKS] + [("gb200-int4-vllm", HOST_PATH_WEIGHTS)])
def test_every_mounted_volume_is_declared_by_its_pod(stack, overrides):
    # The API server refuses a pod whose container mounts a volume the pod does not declare; the
    # schemas cannot see that (a host-path init container once mounted an undeclared verifier).
    _, _, objects = rendered(stack, **overrides)
    pods = [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Deployment", "Job")]
    assert pods
    for pod in pods:
        declared = {v["name"] for v in pod["volumes"]}
        for container in pod["containers"] + pod.get("initContainers", []):
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounted <= declared, (container["name"], mounted - declared)


@pytest.mark.parametrize("stack, overrides", [(s, {}) for s in K8S_STACKS] + [("gb200-int4-vllm", HOST_PATH_WEIGHTS)])
def test_pods_take_the_suite_packages_the_weights_download_installed(stack, overrides):
    """No PyPI at pod start: the download (Job or init container) installs the suite's pins onto the
    weights volume once per pins and image; the admission container reads them from there."""
    _, _, objects = rendered(stack, **overrides)
    (config_map,) = [c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == manifests.ADMISSION_CONFIGMAP]
    config = json.loads(config_map["data"]["admission.json"])
    assert config["prebuilt_dependencies_dir"] == manifests.VERIFIER_PACKAGES_DIR
    assert manifests.VERIFIER_PACKAGES_DIR.startswith(f"{manifests.WEIGHTS_MOUNT}/")
    (verifier,) = [c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == manifests.VERIFIER_CONFIGMAP]
    assert verifier["data"][manifests.VERIFIER_REQUIREMENTS_KEY] == config_map["data"][
        manifests.VERIFIER_REQUIREMENTS_KEY]
    downloads = [c for o in objects if o["kind"] in ("Deployment", "Job")
                 for c in o["spec"]["template"]["spec"].get("initContainers", []) + o["spec"]["template"]["spec"][
                     "containers"] if c["name"] == "download-weights"]
    assert len(downloads) == 1
    assert {"name": "PACKAGES_DIR", "value": manifests.VERIFIER_PACKAGES_DIR} in downloads[0]["env"]
    for deployment in of_kind(objects, "Deployment"):
        mounts = containers(deployment, "admission")["volumeMounts"]
        assert {"name": "weights", "mountPath": manifests.WEIGHTS_MOUNT, "readOnly": True} in mounts
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("stack, overrides, says", [
    # gb200: one pod on one-at-a-time: the only pod goes first; said, with the minutes, and kept.
    ("gb200-int4-vllm", {}, ["the only pod stops first", "without service", "capacity.rollout: surge"]),
    ("mi355x-int4-sglang", {}, ["one of 2 pods out at a time", "1/2 capacity"]),
    ("gb200-int4-vllm", {"capacity": {"rollout": "surge"}}, ["spare set of 4 GPUs", "stays Pending",
                                                              "serves throughout"]),
])
def test_the_plan_says_what_a_release_costs_the_running_endpoint(stack, overrides, says):
    r, sizing, _ = rendered(stack, **overrides)
    cost = manifests.rollout_cost(r, sizing)
    for words in says:
        assert words in cost, (words, cost)
    minutes = -(-manifests.pod_cold_start_seconds(sizing) // 60)
    if r.spec.capacity.rollout != "surge":
        assert f"about {minutes} min" in cost and "rollout undo" in cost
    header = manifests.render_k8s_artifacts(r, sizing, render_launch(r))["kubernetes.yaml"].split("\n---")[0]
    assert f"# {cost}" in header.splitlines()


@pytest.mark.parametrize("stack", K8S_STACKS)
def test_the_yaml_a_hand_applier_uses_carries_no_pulumi_annotation(stack):
    _, _, objects = rendered(stack)
    assert "pulumi.com/" not in json.dumps(objects)


@pytest.mark.parametrize("stack", K8S_STACKS)
def test_the_gates_rollout_wait_uses_the_sizings_windows(stack):
    r, sizing, objects = rendered(stack)
    wait = manifests.rollout_wait(r, sizing)
    assert wait["deployments"] == [d["metadata"]["name"] for d in of_kind(objects, "Deployment")]
    assert wait["namespace"] == r.spec.target.kubernetes.namespace
    # One pod: its pull, the startup window (the kubelet's kill comes first) and its admission suite.
    assert wait["pod_ready_seconds"] > manifests.IMAGE_PULL_SECONDS + manifests.startup_window_seconds(sizing)
    # A scaling stack's rollout may find the range's top, and each old pod frees its GPUs only after
    # its drain (for a fixed stack: the pods it has, no drain).
    from kimi_fleet.autoscaling import scaling_policy
    policy = scaling_policy(r, sizing)
    drain = policy.drain_timeout_seconds if policy else 0
    assert wait["timeout_seconds"] == (wait["pod_ready_seconds"] + drain) * (
        r.spec.capacity.most_replicas * r.engines_per_node)


def test_a_scaling_stacks_rollout_waits_out_an_old_pods_drain():
    """Review F3: with no spare GPUs the new pod stays Pending while the old one drains (up to the
    policy's drain timeout): neither the gate's scheduling grace nor the Deployment's progress
    deadline may call that a failed rollout (the gate would then undo it into the same wait)."""
    from kimi_fleet.autoscaling import scaling_policy
    r, sizing, objects = rendered("mi355x-int4-sglang")  # scales 2-6
    drain = scaling_policy(r, sizing).drain_timeout_seconds
    assert drain > 0
    wait = manifests.rollout_wait(r, sizing)
    assert wait["scheduling_grace_seconds"] == manifests.SCHEDULING_GRACE_SECONDS + drain
    engines = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].startswith("kimi-engine")]
    assert engines
    for deployment in engines:
        assert deployment["spec"]["progressDeadlineSeconds"] == (
            manifests.deployment_timeout_seconds(r, sizing, rolling=False) + drain)
    fixed, fixed_sizing, _ = rendered("gb200-int4-vllm")  # no scaling: pods stop at once, nothing to wait out
    assert manifests.rollout_wait(fixed, fixed_sizing)["scheduling_grace_seconds"] == manifests.SCHEDULING_GRACE_SECONDS
