"""Weight loaders (issue 25 item 5): the catalog's loader table against the recorded parsers of the
pinned releases, where a loader is rendered and where not (and why), and the plan's cold start and
the autoscaler's time to ready moving only through the adopted loader's rate."""

from __future__ import annotations

import copy
import math

import pytest

from kimi_fleet import autoscaling, catalog
from kimi_fleet.engines.base import Engine
from kimi_fleet.engines.flags import load_manifest
from kimi_fleet.launch import render_launch
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size, volume_read_bytes_per_second
from kimi_fleet.spec import StackSpecError
from kimi_fleet.stackfile import load_stack_config, stack_file
from kimi_fleet.validation import parse_spec

ADOPTED = [row for row in catalog.LOADERS if row.adopted]


def stack(name: str, **changes) -> Resolved:
    """A stack of stacks/, with top-level sections merged (built here: stacks/ are the lead's)."""
    values = copy.deepcopy(load_stack_config(stack_file(name)).values)
    for key, value in changes.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return Resolved(parse_spec(values, name, f"stacks/Pulumi.{name}.yaml"))


def argv(r: Resolved) -> list[str]:
    return [arg for instance in render_launch(r).instances for arg in instance.argv]


def default_sizing(r: Resolved, monkeypatch):
    """The same stack sized with the engine's default loader (what the plan said before loaders)."""
    with monkeypatch.context() as patch:
        patch.setattr(Engine, "loader", lambda self, resolved: (None, "the default, for comparison"))
        return size(r)


def test_at_least_one_loader_is_adopted_and_every_row_says_why_and_where():
    assert ADOPTED
    for row in catalog.LOADERS:
        assert row.why and row.where and row.figure and row.figure_source.where, row.id
        assert row.releases and all(load_manifest(row.engine, v) for v in row.releases), row.id
        if row.adopted:  # an adopted loader is modelled from a figure comparable to the default
            assert row.cold_seconds and row.default_cold_seconds > row.cold_seconds, row.id


@pytest.mark.parametrize("row", catalog.LOADERS, ids=lambda row: row.id)
def test_each_loader_is_a_load_format_of_its_releases_recorded_parser(row):
    for version in row.releases:
        option = load_manifest(row.engine, version)["options"].get("--load-format")
        assert option and option["takes_value"], (row.id, version)
        if option["choices"] is not None:  # SGLang: argparse choices, recorded
            assert row.load_format in option["choices"], (row.id, version, option["choices"])
        else:  # vLLM: a free string its loader registry checks at load time; the row names the registry
            assert "_LOAD_FORMAT_TO_MODEL_LOADER" in row.where or row.load_format == "auto", row.id


def test_the_0_5_9_parser_has_fastsafetensors_and_no_streamer_as_the_table_says():
    choices = load_manifest("sglang", "0.5.9")["options"]["--load-format"]["choices"]
    assert "fastsafetensors" in choices and "runai_streamer" not in choices
    streamer = next(row for row in catalog.LOADERS if row.id == "sglang-runai-streamer")
    assert "0.5.9" not in streamer.releases


@pytest.mark.parametrize("row", ADOPTED, ids=lambda row: row.id)
def test_an_adopted_loaders_images_run_one_of_its_releases(row):
    assert row.images and row.dependency
    for image in row.images:
        entry = catalog.ENGINE_IMAGES[image]
        assert entry.engine == row.engine and entry.package_version in row.releases, image


def test_a_stack_on_a_fast_local_volume_gets_the_adopted_loader_as_a_managed_flag():
    r = stack("h200-int4-vllm")
    row, why = r.adapter.loader(r)
    assert row is not None and row.load_format == "fastsafetensors"
    args = argv(r)
    assert args[args.index("--load-format") + 1] == "fastsafetensors"
    assert "fastsafetensors" in why and row.figure_source.where in why


def test_cold_start_changes_only_through_the_loaders_rate(monkeypatch):
    r = stack("h200-int4-vllm")
    row, _ = r.adapter.loader(r)
    with_loader, default = size(r), default_sizing(r, monkeypatch)
    assert (with_loader.download_seconds, with_loader.verify_seconds) == (default.download_seconds,
                                                                          default.verify_seconds)
    volume, bytes_ = volume_read_bytes_per_second(r), r.checkpoint.size_bytes * r.engines_per_node
    assert default.read_seconds == math.ceil(bytes_ / min(volume, catalog.LOADER_READ_BYTES_PER_SECOND))
    rate = min(volume, catalog.LOADER_READ_BYTES_PER_SECOND * row.cold_speedup)
    assert with_loader.read_seconds == math.ceil(bytes_ / rate) < default.read_seconds
    # From the page cache: the warm-up stays, the weight processing follows the loader's cached ratio.
    processing = catalog.WARM_RESTART_SECONDS - r.engine.warmup_seconds
    assert with_loader.load_seconds == r.engine.warmup_seconds + math.ceil(processing * row.cached_ratio)
    read = next(p for p in with_loader.ready_phases if p["phase"] == "read")
    assert read["loader"] == "fastsafetensors" and row.figure_source.where in read["basis"]


def test_the_volume_bounds_the_loader():
    r = stack("spheron-h200-int4-vllm")  # a host's local NVMe, slower than the loader's modelled rate
    row, _ = r.adapter.loader(r)
    assert row is not None
    assert size(r).read_seconds == math.ceil(r.checkpoint.size_bytes / volume_read_bytes_per_second(r))


def test_seed_003s_default_path_is_unchanged():
    """The measured stack runs the default loader: its read and load are seed 003's own figures."""
    r = stack("rtxpro6000-int4-sglang")
    s = size(r)
    assert r.adapter.loader(r)[0] is None and "--load-format" not in argv(r)
    assert s.read_seconds == math.ceil(r.checkpoint.size_bytes / catalog.LOADER_READ_BYTES_PER_SECOND)
    assert s.load_seconds == catalog.WARM_RESTART_SECONDS
    read = next(p for p in s.ready_phases if p["phase"] == "read")
    assert read["loader"] == "default" and "no faster loader" in read["basis"]


@pytest.mark.parametrize("name,changes,reason", [
    ("gb200-int4-vllm", {}, "0.22.1 only"),  # vLLM 0.19.1: fastsafetensors only under an extra
    ("rtxpro6000-nvfp4-vllm", {}, "not known to carry fastsafetensors"),  # the host-built sm_120 image
    ("h200-int4-vllm", {"engine": {"image": "vllm/vllm-openai:v0.19.1-cu130"}}, "0.22.1 only"),
    ("h100-int4-vllm", {}, "one node per replica only"),
    ("b200-nvfp4-vllm", {}, "gain nothing"),  # EBS reads slower than the default loader
    ("h200-int4-sglang", {}, "no loader of sglang is adopted"),
    ("mi355x-int4-sglang", {}, "GDS"),
])
def test_no_loader_where_a_condition_fails_and_the_plan_says_why(name, changes, reason, monkeypatch):
    r = stack(name, **changes)
    row, why = r.adapter.loader(r)
    assert row is None and reason in why, why
    assert "--load-format" not in argv(r)
    s = size(r)
    assert s.read_seconds == default_sizing(r, monkeypatch).read_seconds
    read = next(p for p in s.ready_phases if p["phase"] == "read")
    assert why in read["basis"]


def test_no_room_for_a_staged_file_means_no_loader():
    r = stack("h200-int4-vllm")
    row = next(row for row in ADOPTED if row.id == "vllm-fastsafetensors")
    tight = catalog.Loader(**{**row.__dict__, "staged_files_per_rank": 10})  # ten ~9.3 GB files beside the weights
    assert r.adapter._staging_room(r, row, 0) > 0 > r.adapter._staging_room(r, tight, 0)


@pytest.mark.parametrize("name,extra", [
    ("h200-int4-vllm", ["--load-format", "safetensors"]),
    ("h200-int4-vllm", ["--load_format=auto"]),
    ("h200-int4-vllm", ["--model-loader-extra-config", "x"]),
    ("spheron-h200-int4-vllm", ["--load-format=runai_streamer"]),
    ("h200-int4-sglang", ["--load-format", "fastsafetensors"]),
])
def test_extra_args_cannot_override_the_managed_loader(name, extra):
    flag = extra[0].split("=")[0].replace("_", "-")
    with pytest.raises(StackSpecError) as refused:
        stack(name, engine={"extraArgs": extra})
    assert f"engine.extraArgs (given {extra[0]!r}): sets {flag}, which kimi-fleet renders" in str(refused.value)


def test_the_autoscalers_time_to_ready_follows_the_loader(monkeypatch):
    r = stack("h200-int4-vllm")  # the scaling stack on AWS
    with_loader, default = size(r), default_sizing(r, monkeypatch)
    terms, before = autoscaling.time_to_ready_terms(r, with_loader), autoscaling.time_to_ready_terms(r, default)
    gain = default.cold_start_seconds - with_loader.cold_start_seconds
    assert gain == (default.read_seconds - with_loader.read_seconds) + (default.load_seconds - with_loader.load_seconds)
    assert gain > 0 and sum(before.values()) - sum(terms.values()) == gain


def test_budgets_count_the_default_loader_not_the_adopted_ones_published_speed_up():
    """Review of issue 25: a load budget or a group's grace cut to a loader's speed-up measured on other
    hardware would kill loads, and replace nodes, whenever that speed-up does not show here."""
    from kimi_fleet import health

    sizing = size(Resolved(load_stack_config(stack_file("h200-int4-vllm")).spec()))
    read = next(p for p in sizing.ready_phases if p["phase"] == "read")
    assert read["loader"] == "fastsafetensors" and sizing.read_seconds < sizing.budget_seconds("read")
    default_rate = min(volume_read_bytes_per_second(Resolved(load_stack_config(stack_file("h200-int4-vllm")).spec())),
                       catalog.LOADER_READ_BYTES_PER_SECOND)
    assert sizing.budget_seconds("read") == math.ceil(catalog.CHECKPOINTS["int4"].size_bytes / default_rate)
    assert sizing.budget_seconds("load") >= sizing.load_seconds
    windows = health.windows(sizing, verification_seconds=900, fleet=True)
    assert windows.load_budget_terms["read"] == sizing.budget_seconds("read")
    assert windows.grace_terms["read"] == sizing.budget_seconds("read")
    # A stack on the default loader: the budget is the expectation itself.
    plain = size(Resolved(load_stack_config(stack_file("rtxpro6000-int4-sglang")).spec()))
    assert plain.budget_seconds("read") == plain.read_seconds and plain.budget_seconds("load") == plain.load_seconds
