"""Scripts shipped to Kubernetes pods only (Python 3 standard library), beside node scripts they
import: read with `pod_script(name)`, so the file tested here is the file that runs there."""

from importlib import resources

FABRIC_PROBE_SCRIPT = "fabric_probe.py"


def pod_script(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text()
