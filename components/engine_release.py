"""EngineRelease: the engine image and weight revision a stack runs, recorded for policies and diffs.

Declares no cloud resource; its props (image, revision, launch flags) land in the state so the
policy pack can refuse unpinned releases and preview diffs show a changed flag.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi


@dataclass
class EngineReleaseArgs:
    engine: str
    image: str
    repo: str
    revision: str
    served_name: str
    #: one argv per engine on the node
    commands: list[list[str]]


class EngineRelease(pulumi.ComponentResource):
    image: pulumi.Output[str]
    revision: pulumi.Output[str]

    def __init__(self, name: str, args: EngineReleaseArgs, opts: pulumi.ResourceOptions | None = None):
        props = {
            "engine": args.engine,
            "image": args.image,
            "repo": args.repo,
            "revision": args.revision,
            "servedName": args.served_name,
            "commands": args.commands,
        }
        super().__init__("kimi-fleet:engine:EngineRelease", name, props, opts)
        self.image = pulumi.Output.from_input(args.image)
        self.revision = pulumi.Output.from_input(args.revision)
        self.register_outputs({"image": self.image, "revision": self.revision})
