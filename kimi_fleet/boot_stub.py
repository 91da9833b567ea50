"""An AWS node's user data: the frozen boot loader and one command (issue 20).

The text depends on the loader (node_scripts/boot_loader.py), the stack's release pointer and
region, and for a fleet the name of the instance tag that carries its release digest: nothing a
release changes. So a single node's launch template, and the instance AWS cannot update in place,
stay as they are across releases; the release bundle (applied by the SSM association) carries every
node file, the applier and the package list. A fleet's template changes per release through its tag
(`RELEASE_TAG`, the bundle's SHA-256), which starts the instance refresh, while its user data, like
build/<stack>/user-data.yaml, stays byte-identical to what the template carries.
"""

from __future__ import annotations

import gzip

import yaml

from kimi_fleet.node_scripts import node_script

BOOT_LOADER = "/usr/local/lib/kimi-fleet/boot_loader.py"
#: The launch template's instance tag naming a fleet node's release bundle (IMDS exposes instance
#: tags once the template's metadata options set instance_metadata_tags = "enabled").
RELEASE_TAG = "kimi-fleet:release-bundle"
#: EC2's user data ceiling (bytes, before base64).
EC2_USER_DATA_LIMIT = 16384


class _LiteralDumper(yaml.SafeDumper):
    pass


_LiteralDumper.add_representer(
    str, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value,
                                                       style="|" if "\n" in value else None))


def render_frozen_boot_stub(*, pointer: str, region: str, fleet: bool = False) -> str:
    """The cloud-config: write the loader, run it once. No packages, no release, no digest."""
    command = ["python3", BOOT_LOADER, "--pointer", pointer, "--region", region]
    if fleet:
        command += ["--expect-tag", RELEASE_TAG]
    document = {
        "write_files": [{"path": BOOT_LOADER, "owner": "root:root", "permissions": "0755",
                         "content": node_script("boot_loader.py")}],
        "runcmd": [command],
    }
    text = "#cloud-config\n" + yaml.dump(document, Dumper=_LiteralDumper, sort_keys=False, width=1000)
    size = len(gzip.compress(text.encode(), compresslevel=9, mtime=0))
    if size > EC2_USER_DATA_LIMIT:
        raise ValueError(f"the boot stub is {size} bytes even compressed; EC2 accepts {EC2_USER_DATA_LIMIT}")
    return text
