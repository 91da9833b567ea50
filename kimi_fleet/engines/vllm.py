"""vLLM: `vllm serve`, --gpu-memory-utilization caps the whole footprint, /health is liveness only."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from packaging.version import Version

from kimi_fleet import catalog
from kimi_fleet.engines.base import Engine, LoadMetrics
from kimi_fleet.paths import DRAFT_MOUNT, LOOPBACK, MODEL_MOUNT

if TYPE_CHECKING:
    from kimi_fleet.resolve import Resolved


class VLLM(Engine):
    name = "vllm"
    options = frozenset({"language_model_only", "mm_encoder_tp_mode", "moe_backend", "decode_context_parallel"})
    options_hint = "vLLM uses decodeContextParallel where SGLang uses dpAttention"
    #: vLLM's Prometheus logger (vllm/v1/metrics/loggers.py); the counter gets its _total from prometheus_client.
    load_metrics = LoadMetrics("vllm:generation_tokens_total", "vllm:num_requests_running",
                               "vllm:num_requests_waiting")
    managed_flags = {
        "--tensor-parallel-size": "parallelism.tensorParallel", "--data-parallel-size": "parallelism.dataParallel",
        # vLLM's short aliases -tp and -dp (one dash or two: the check strips dashes).
        "--tp": "parallelism.tensorParallel", "--dp": "parallelism.dataParallel",
        "--kv-cache-dtype": "kvCacheDtype", "--gpu-memory-utilization": "engine.memoryFraction",
        "--max-model-len": "contextLength", "--max-num-batched-tokens": "engine.maxNumBatchedTokens",
        "--tool-call-parser": "(always kimi_k2)", "--reasoning-parser": "(always kimi_k2)",
        "--enable-auto-tool-choice": "(always on for vLLM)", "--served-model-name": "model.servedName",
        "--host": "(always 127.0.0.1)", "--port": "(per engine)", "--quantization": "checkpoint",
        "--mm-encoder-tp-mode": "engine.mmEncoderTpMode", "--speculative-config": "engine.speculative",
        "--language-model-only": "engine.languageModelOnly", "--model": "model",
        "--enable-expert-parallel": "parallelism.expertParallel",
        "--decode-context-parallel-size": "parallelism.decodeContextParallel",
        "--moe-backend": "engine.moeBackend",
        "--pipeline-parallel-size": "parallelism.pipelineParallel", "--pp": "parallelism.pipelineParallel",
        "--nnodes": "parallelism.nodes", "--node-rank": "(per node of the replica)",
        "--master-addr": "(the replica's leader)", "--master-port": "(the catalog's rendezvous port)",
        "--headless": "(every node but the leader)",
        # vLLM's Prometheus logger is on by default; this turns it off (api_server.py:357 log_stats), which
        # would blind the dashboards, the alerts, the scaling policy and the watchdog's busy test.
        "--disable-log-stats": "(metrics stay on: dashboards, alerts, scaling and the watchdog read them)",
        # The weight loader decides the plan's read and load phases (catalog.LOADERS, sizing.ready_phases).
        "--load-format": "(the catalog's adopted loader for this release, image and volume: catalog.LOADERS)",
        "--model-loader-extra-config": "(no adopted loader takes one: catalog.LOADERS)",
    }

    def mm_encoder_tp_mode(self, r: Resolved) -> str | None:
        if r.spec.engine.language_model_only:
            return None
        return r.spec.engine.mm_encoder_tp_mode or "data"

    def problems(self, r: Resolved) -> Iterator[str]:
        dcp = r.spec.parallelism.decode_context_parallel
        if dcp > 1 and r.tensor_parallel % dcp:
            yield (f"field kimi-fleet:parallelism.decodeContextParallel (given {dcp}): must divide "
                   f"tensorParallel {r.tensor_parallel}")

    def entrypoint_words(self, r: Resolved) -> list[str]:
        return ["vllm", "serve"]

    def real_parser(self):
        import vllm
        import vllm.platforms
        from vllm.platforms.cpu import CpuPlatform

        # Argument parsing needs no GPU: pin the platform so vLLM does not probe for one.
        vllm.platforms._current_platform = CpuPlatform()
        from vllm.entrypoints.openai.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        return make_arg_parser(FlexibleArgumentParser(prog="vllm serve")), vllm.__version__

    def json_option_keys(self, dest: str) -> list[str] | None:
        import dataclasses

        import vllm.config

        cls = getattr(vllm.config, "".join(part.capitalize() for part in dest.split("_")), None)
        if cls is None:
            return None
        if dataclasses.is_dataclass(cls):
            return sorted(f.name for f in dataclasses.fields(cls))
        fields = getattr(cls, "model_fields", None)
        return sorted(fields) if fields else None

    def argv(self, r: Resolved, port: int) -> list[str]:
        spec, engine, p = r.spec, r.spec.engine, r.spec.parallelism
        argv = [
            *self.entrypoint_words(r), MODEL_MOUNT,
            "--served-model-name", spec.model.served_name,
            "--tensor-parallel-size", str(r.tensor_parallel),
            "--trust-remote-code",
            "--tool-call-parser", "kimi_k2",
            "--enable-auto-tool-choice",
            "--reasoning-parser", "kimi_k2",
            self.profile.memory_flag, f"{r.memory_knob:g}",
            "--max-model-len", str(spec.context_length),
            "--enable-chunked-prefill",
            "--max-num-batched-tokens", str(r.max_num_batched_tokens),
            "--host", LOOPBACK, "--port", str(port),
        ]
        kv = self.kv_dtype_flag_value(r.kv_cache_dtype)
        if kv != "auto":
            argv += ["--kv-cache-dtype", kv]
        if engine.language_model_only:
            argv += ["--language-model-only"]
        elif r.mm_encoder_tp_mode:
            argv += ["--mm-encoder-tp-mode", r.mm_encoder_tp_mode]
        if p.data_parallel > 1:
            argv += ["--data-parallel-size", str(p.data_parallel)]
        if p.expert_parallel:
            argv += ["--enable-expert-parallel"]
        if p.decode_context_parallel > 1:
            argv += ["--decode-context-parallel-size", str(p.decode_context_parallel)]
        if engine.moe_backend:
            argv += ["--moe-backend", engine.moe_backend]
        argv += self.loader_args(r)
        argv += r.quirk_flags
        if engine.speculative == "eagle3":
            # Dotted config flags instead of a JSON blob: env-file values cannot carry quotes.
            argv += [f"--speculative-config.model={DRAFT_MOUNT}", "--speculative-config.method=eagle3",
                     "--speculative-config.num_speculative_tokens=3"]
        return argv

    def multi_node_args(self, r: Resolved, node_rank: int, leader: str, port: int | None = None) -> list[str]:
        # vllm 0.22.1 serve: the mp executor spans nodes (config/parallel.py:845); a worker runs no
        # API server (--headless, cli/serve.py:61-69) and dials the leader's torch rendezvous.
        support = catalog.MULTI_NODE[self.name]
        args = ["--pipeline-parallel-size", str(r.pipeline_parallel), "--nnodes", str(r.nodes_per_replica),
                "--node-rank", str(node_rank), "--master-addr", leader, "--master-port", str(port or support.rendezvous_port)]
        return args + ([support.worker_flag] if node_rank and support.worker_flag else [])

    def weight_shards(self, r: Resolved) -> int:
        p = r.spec.parallelism
        # Expert parallel with DP spreads the experts over TP x DP ranks; attention stays per replica.
        return r.tensor_parallel * p.data_parallel if p.expert_parallel and p.data_parallel > 1 else r.tensor_parallel

    def _cudagraphs_in_budget(self, r: Resolved) -> bool:
        # An image of unknown version is sized the conservative way: graphs inside the budget.
        version = r.engine_version
        return version is None or version >= Version(catalog.VLLM_MEMORY.cudagraphs_in_budget_since)

    def inside_knob(self, r: Resolved) -> dict[str, int]:
        items = super().inside_knob(r)
        items["start-up profile run (encoder, forward, sampler)"] = catalog.VLLM_MEMORY.profile_peak_bytes
        if self._cudagraphs_in_budget(r):
            items["CUDA graphs"] = catalog.VLLM_MEMORY.cudagraph_bytes
        return items

    def outside_knob(self, r: Resolved) -> dict[str, int]:
        return {} if self._cudagraphs_in_budget(r) else {"CUDA graphs": catalog.VLLM_MEMORY.cudagraph_bytes}

    def kv_sharing(self, r: Resolved) -> tuple[int, int]:
        p = r.spec.parallelism
        return p.decode_context_parallel, p.data_parallel
