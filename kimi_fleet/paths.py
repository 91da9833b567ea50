"""Fixed places on a node and in an engine container. Every renderer takes paths from here."""

MODEL_MOUNT = "/models/kimi"
DRAFT_MOUNT = "/models/draft"
ENV_DIR = "/etc/kimi-fleet"
#: The systemd slice every engine container runs in (docker --cgroup-parent): the node firewall refuses
#: the instance metadata service to it by cgroup, since engines share the host's network.
ENGINE_SLICE = "kimi-engines.slice"
#: Engines bind here only: the authenticating proxy is the one way in.
LOOPBACK = "127.0.0.1"
#: The engines' compile and JIT caches inside the container (a directory beside the weights outside).
COMPILE_CACHE_MOUNT = "/kimi-fleet-cache"
#: Under a managed mirror's prefix: the engines' compile caches, shared between nodes
#: (<prefix>/.compile-cache/<engine--image--accelerator>/<launch digest>.tar). A Hugging Face repo id
#: never starts with a dot, so no checkpoint can collide with it.
MIRROR_COMPILE_CACHE_DIR = ".compile-cache"


def mirror_compile_cache_prefix(mirror_prefix: str) -> str:
    """The key prefix of the shared compile caches in a mirror whose checkpoints are under `mirror_prefix`."""
    return "/".join(p for p in (mirror_prefix, MIRROR_COMPILE_CACHE_DIR) if p)
