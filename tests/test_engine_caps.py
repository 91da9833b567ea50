"""Engines cannot write raw frames past the node firewall: the engine guard (nftables, by cgroup)
sits on the IP output hook, which packet sockets never pass, so an engine keeping CAP_NET_RAW could
still speak to the metadata service in raw Ethernet (a security review reproduced it in a network
namespace). Every engine container drops CAP_NET_RAW; here the kernel shows what that drop does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from kimi_fleet.launch import COMMON_DOCKER_ARGS, docker_argv, render_launch
from kimi_fleet.resolve import Resolved
from kimi_fleet.stackfile import load_stack_config, stack_file

OPEN_PACKET_SOCKET = ("import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)); "
                      "print('opened')")
NODE_STACKS = ["h200-int4-sglang", "h200-int4-vllm", "b200-nvfp4-vllm", "mi300x-int4-sglang",
               "rtxpro6000-nvfp4-vllm", "spheron-h200-int4-vllm"]


@pytest.mark.parametrize("stack", NODE_STACKS)
def test_every_engine_container_drops_raw_sockets_and_privilege_gains(stack):
    r = Resolved(load_stack_config(stack_file(stack)).spec())
    for instance in render_launch(r).instances:
        argv = docker_argv(render_launch(r), instance)
        image_at = argv.index(render_launch(r).image)
        assert "--cap-drop=NET_RAW" in argv[:image_at] and "--security-opt=no-new-privileges" in argv[:image_at]
    assert "--cap-drop=NET_RAW" in COMMON_DOCKER_ARGS


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_without_cap_net_raw_no_packet_socket_opens():
    """What `docker run --cap-drop=NET_RAW` leaves the engine: the kernel refuses a packet socket.
    The control run (the capability kept) opens one, so the refusal is the drop's doing."""
    kept = subprocess.run([sys.executable, "-c", OPEN_PACKET_SOCKET], capture_output=True, text=True, timeout=30)
    if kept.returncode != 0:
        pytest.skip(f"this machine refuses packet sockets even to root: {kept.stderr.strip()[-200:]}")
    assert kept.stdout.strip() == "opened"
    dropped = subprocess.run(["setpriv", "--bounding-set=-net_raw", "--inh-caps=-net_raw", sys.executable, "-c",
                              OPEN_PACKET_SOCKET], capture_output=True, text=True, timeout=30)
    assert dropped.returncode != 0 and "PermissionError" in dropped.stderr, dropped.stdout + dropped.stderr
