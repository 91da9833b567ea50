"""Scripts shipped to nodes and pods as they are (Python 3 standard library only): read with
`node_script(name)`, so the file tested here is the file that runs there."""

from importlib import resources

GENERATION_PROBE_SCRIPT = "generation_probe.py"
#: One tiny generation may take this long: under full load a 4-token answer waits behind long
#: prefills, and a false "dead" costs a restart (a warm start of many minutes).
GENERATION_PROBE_TIMEOUT_SECONDS = 60


def node_script(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text()
