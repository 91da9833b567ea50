"""Fixed places on a node and in an engine container. Every renderer takes paths from here."""

MODEL_MOUNT = "/models/kimi"
DRAFT_MOUNT = "/models/draft"
ENV_DIR = "/etc/kimi-fleet"
#: Engines bind here only: the authenticating proxy is the one way in.
LOOPBACK = "127.0.0.1"
#: The engines' compile and JIT caches inside the container (a directory beside the weights outside).
COMPILE_CACHE_MOUNT = "/kimi-fleet-cache"
