"""SGLang: `sglang serve` (0.5.12+) or `sglang.launch_server`; --mem-fraction-static covers weights +
KV and the engine needs room outside it; /health_generate runs a real generation; DP attention gives
each DP rank its own KV pool and splits the chunked prefill size between ranks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from packaging.version import Version

from kimi_fleet import catalog
from kimi_fleet.engines.base import Engine, LoadMetrics
from kimi_fleet.paths import DRAFT_MOUNT, LOOPBACK, MODEL_MOUNT

if TYPE_CHECKING:
    from kimi_fleet.resolve import Resolved

MB = catalog.MiB


class SGLang(Engine):
    name = "sglang"
    options = frozenset({"dp_attention", "cuda_graph_max_batch"})
    options_hint = "SGLang needs nothing extra for vision; it uses dpAttention where vLLM uses decodeContextParallel"
    #: SGLang's collector (python/sglang/srt/metrics/collector.py), on with --enable-metrics (argv below).
    #: The token counter is the per-iteration one (catalog.ENGINE_METRICS progress_tokens): SGLang counts
    #: sglang:generation_tokens_total only when a request finishes, so a long generation would look stalled.
    load_metrics = LoadMetrics("sglang:realtime_tokens_total", "sglang:num_running_reqs", "sglang:num_queue_reqs")
    managed_flags = {
        "--tp-size": "parallelism.tensorParallel", "--tensor-parallel-size": "parallelism.tensorParallel",
        "--dp-size": "parallelism.dataParallel", "--data-parallel-size": "parallelism.dataParallel",
        "--enable-dp-attention": "parallelism.dpAttention", "--ep-size": "parallelism.expertParallel",
        "--expert-parallel-size": "parallelism.expertParallel",
        "--kv-cache-dtype": "kvCacheDtype", "--mem-fraction-static": "engine.memoryFraction",
        "--context-length": "contextLength", "--chunked-prefill-size": "engine.maxNumBatchedTokens",
        "--cuda-graph-max-bs": "engine.cudaGraphMaxBatch",
        "--tool-call-parser": "(always kimi_k2)", "--reasoning-parser": "(always kimi_k2)",
        "--served-model-name": "model.servedName", "--host": "(always 127.0.0.1)", "--port": "(per engine)",
        "--quantization": "checkpoint", "--model-path": "model", "--model": "model",
        "--speculative-algorithm": "engine.speculative",
        "--pp-size": "parallelism.pipelineParallel", "--pipeline-parallel-size": "parallelism.pipelineParallel",
        "--nnodes": "parallelism.nodes", "--node-rank": "(per node of the replica)",
        "--dist-init-addr": "(the replica's leader)",
        "--enable-metrics": "(always on: dashboards, alerts, scaling and the watchdog read them)",
        # Every TP rank's scheduler would export its own series: sum() over them would count a request n times.
        "--enable-metrics-for-all-schedulers": "(off: one series per engine)",
        "--speculative-draft-model-path": "engine.speculativeDraftRepo",
        # The weight loader decides the plan's read and load phases (catalog.LOADERS, sizing.ready_phases).
        "--load-format": "(the catalog's adopted loader for this release, image and volume: catalog.LOADERS)",
        "--model-loader-extra-config": "(no adopted loader takes one: catalog.LOADERS)",
    }
    #: Measured: seed 003 ran with 98.9% of the engine's own estimate free outside the knob.
    outside_tolerance = catalog.SGLANG_RESERVE.tolerance

    def data_parallel_gpu_factor(self, r: Resolved) -> int:
        # DP attention splits one engine's TP ranks into attention groups; plain DP adds replicas.
        p = r.spec.parallelism
        return 1 if p.dp_attention else p.data_parallel

    def _dp_split(self, r: Resolved) -> int:
        """How many ranks share one --chunked-prefill-size: SGLang's own post-init divides it by dp_size
        under DP attention (catalog.SGLANG_DP_ATTENTION_CHUNK, with its file:line per release)."""
        p = r.spec.parallelism
        return p.data_parallel if p.dp_attention and p.data_parallel > 1 else 1

    def effective_chunk(self, r: Resolved) -> int:
        """The chunk each rank runs with: the flag after ServerArgs._handle_data_parallelism."""
        return self.chunked_prefill_flag(r) // self._dp_split(r)

    def post_init_adjustments(self, r: Resolved) -> list[dict]:
        """What this release's ServerArgs.__post_init__ makes of the flags the plan renders."""
        rule, split = catalog.SGLANG_DP_ATTENTION_CHUNK, self._dp_split(r)
        if split == 1:
            return []
        version = r.image_entry.package_version if r.image_entry else None
        where = rule.releases.get(version) if version else None
        given, effective = self.chunked_prefill_flag(r), self.effective_chunk(r)
        return [{"flag": rule.flag, "setting": rule.setting, "given": given, "effective": effective,
                 "scope": f"each of {split} DP attention ranks", "log": rule.log.format(effective),
                 "where": (f"sglang {version} {where}" if where else
                           f"sglang {version or '(unknown version)'}: not read; as in "
                           f"{' and '.join(rule.releases)}")}]

    def chunked_prefill_flag(self, r: Resolved) -> int:
        """The flag value that leaves each rank the intended prefill chunk. Unset, the intent is the
        engine's own behaviour: the default chunk split between the DP ranks."""
        split = self._dp_split(r)
        if r.spec.engine.max_num_batched_tokens:
            return r.spec.engine.max_num_batched_tokens * split
        return self.profile.default_batched_tokens

    def graph_batch(self, r: Resolved) -> int:
        """--cuda-graph-max-bs: the stack's, or the engine's default for this GPU and TP."""
        if r.spec.engine.cuda_graph_max_batch:
            return r.spec.engine.cuda_graph_max_batch
        reserve = catalog.SGLANG_RESERVE
        small_tp = r.tensor_parallel < reserve.small_tp and r.accelerator.memory_bytes < reserve.small_tp_gpu_mb * MB
        return reserve.default_graph_batch_small_tp if small_tp else reserve.default_graph_batch

    def entrypoint_words(self, r: Resolved) -> list[str]:
        version = r.engine_version
        if version is not None and version >= Version(catalog.SGLANG_SERVE_SINCE):
            return ["sglang", "serve"]
        # Older or unknown images: the module form every version accepts.
        return ["python3", "-m", "sglang.launch_server"]

    def real_parser(self):
        import argparse

        import sglang
        from sglang.srt.server_args import ServerArgs

        parser = argparse.ArgumentParser(prog="sglang serve")
        ServerArgs.add_cli_args(parser)
        return parser, sglang.__version__

    def argv(self, r: Resolved, port: int) -> list[str]:
        spec, engine, p = r.spec, r.spec.engine, r.spec.parallelism
        argv = [
            *self.entrypoint_words(r),
            "--model-path", MODEL_MOUNT,
            "--served-model-name", spec.model.served_name,
            "--tp-size", str(r.tensor_parallel),
            "--trust-remote-code",
            "--tool-call-parser", "kimi_k2",
            "--reasoning-parser", "kimi_k2",
            self.profile.memory_flag, f"{r.memory_knob:g}",
            "--context-length", str(spec.context_length),
            "--chunked-prefill-size", str(self.chunked_prefill_flag(r)),
            "--host", LOOPBACK, "--port", str(port),
            "--enable-metrics",
        ]
        if engine.cuda_graph_max_batch:
            argv += ["--cuda-graph-max-bs", str(engine.cuda_graph_max_batch)]
        kv = self.kv_dtype_flag_value(r.kv_cache_dtype)
        if kv != "auto":
            argv += ["--kv-cache-dtype", kv]
        if p.data_parallel > 1:
            argv += ["--dp-size", str(p.data_parallel)]
            if p.dp_attention:
                argv += ["--enable-dp-attention"]
        if p.expert_parallel:
            argv += ["--ep-size", str(r.tensor_parallel)]
        argv += self.loader_args(r)
        argv += r.quirk_flags
        if engine.speculative == "eagle3":
            argv += ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", DRAFT_MOUNT,
                     "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
                     "--speculative-num-draft-tokens", "4"]
        return argv

    def multi_node_args(self, r: Resolved, node_rank: int, leader: str, port: int | None = None) -> list[str]:
        # sglang 0.5.12 server_args.py:5067,5558-5567: every node runs the same line with its rank;
        # the others serve a dummy /health only, so the proxy and probes reach the leader alone.
        support = catalog.MULTI_NODE[self.name]
        return ["--pp-size", str(r.pipeline_parallel), "--nnodes", str(r.nodes_per_replica),
                "--node-rank", str(node_rank), "--dist-init-addr", f"{leader}:{port or support.rendezvous_port}"]

    # --- memory model ---------------------------------------------------------------------------

    def attention_replicas(self, r: Resolved) -> int:
        p = r.spec.parallelism
        return p.data_parallel if p.dp_attention else 1

    def replicated_embedding(self, r: Resolved) -> int:
        if not r.spec.parallelism.dp_attention:
            return 0
        embedding = catalog.KIMI_K26.embedding_params * catalog.BF16_BYTES
        return embedding - embedding // r.tensor_parallel

    def kv_sharing(self, r: Resolved) -> tuple[int, int]:
        # A sequence lives on one rank group; DP attention groups or plain DP replicas: one pool each.
        return 1, r.spec.parallelism.data_parallel

    def attention_groups(self, r: Resolved) -> int:
        p = r.spec.parallelism
        return p.data_parallel if p.dp_attention else 1

    def outside_knob(self, r: Resolved) -> dict[str, int]:
        """The engine's own estimate (ServerArgs._handle_gpu_memory_settings), term by term."""
        c, p = catalog.SGLANG_RESERVE, r.spec.parallelism
        bs, dp = self.graph_batch(r), (p.data_parallel if p.dp_attention else 1)
        items = {
            "request table and metadata": c.base_mb,
            # The flag's value, not each rank's: _handle_gpu_memory_settings runs before the DP split
            # (catalog.SGLANG_DP_ATTENTION_CHUNK), and the DP ranks' chunks meet in the MoE.
            "prefill activations": max(self.chunked_prefill_flag(r), c.min_chunk_tokens) * c.per_chunk_token_mb,
            "CUDA graphs": bs * c.per_graph_batch_mb,
            "TP collectives": r.tensor_parallel * c.per_tp_rank_mb,
        }
        if p.dp_attention:
            items["DP attention padding"] = bs * dp * c.dp_attention_per_graph_batch_rank_mb
            if bs > c.large_graph_batch:
                items["DP attention padding"] += bs * dp * c.large_graph_extra_mb
        total = sum(items.values())
        if r.accelerator.memory_bytes > c.large_gpu_mb * MB and total < c.large_gpu_floor_mb:
            items["floor on large GPUs"] = c.large_gpu_floor_mb - total
        if r.spec.engine.speculative != "off":
            items["EAGLE draft graphs"] = c.eagle_draft_mb
        return {name: int(mb * MB) for name, mb in items.items()}

    def per_rank(self, r: Resolved) -> dict[str, int]:
        return {"prefill tokens per step": self.effective_chunk(r),
                "CUDA graph batch": self.graph_batch(r)}
