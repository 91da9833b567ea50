"""SGLang: `sglang.launch_server`, --mem-fraction-static covers weights + KV, /health_generate runs a
real generation, DP attention gives each DP rank its own KV pool."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kimi_fleet import catalog
from kimi_fleet.engines.base import Engine
from kimi_fleet.paths import DRAFT_MOUNT, LOOPBACK, MODEL_MOUNT

if TYPE_CHECKING:
    from kimi_fleet.resolve import Resolved


class SGLang(Engine):
    name = "sglang"
    options = frozenset({"dp_attention"})
    options_hint = "SGLang needs nothing extra for vision; it uses dpAttention where vLLM uses decodeContextParallel"
    managed_flags = {
        "--tp-size": "parallelism.tensorParallel", "--tensor-parallel-size": "parallelism.tensorParallel",
        "--dp-size": "parallelism.dataParallel", "--data-parallel-size": "parallelism.dataParallel",
        "--enable-dp-attention": "parallelism.dpAttention", "--ep-size": "parallelism.expertParallel",
        "--expert-parallel-size": "parallelism.expertParallel",
        "--kv-cache-dtype": "kvCacheDtype", "--mem-fraction-static": "engine.memoryFraction",
        "--context-length": "contextLength", "--chunked-prefill-size": "engine.maxNumBatchedTokens",
        "--tool-call-parser": "(always kimi_k2)", "--reasoning-parser": "(always kimi_k2)",
        "--served-model-name": "model.servedName", "--host": "(always 127.0.0.1)", "--port": "(per engine)",
        "--quantization": "checkpoint", "--model-path": "model", "--model": "model",
        "--speculative-algorithm": "engine.speculative",
        "--speculative-draft-model-path": "engine.speculativeDraftRepo",
    }

    def data_parallel_gpu_factor(self, r: Resolved) -> int:
        # DP attention splits one engine's TP ranks into attention groups; plain DP adds replicas.
        p = r.spec.parallelism
        return 1 if p.dp_attention else p.data_parallel

    def argv(self, r: Resolved, port: int) -> list[str]:
        spec, engine, p = r.spec, r.spec.engine, r.spec.parallelism
        argv = [
            "python3", "-m", "sglang.launch_server",
            "--model-path", MODEL_MOUNT,
            "--served-model-name", spec.model.served_name,
            "--tp", str(r.tensor_parallel),
            "--trust-remote-code",
            "--tool-call-parser", "kimi_k2",
            "--reasoning-parser", "kimi_k2",
            self.profile.memory_flag, f"{r.memory_knob:g}",
            "--context-length", str(spec.context_length),
            "--chunked-prefill-size", str(r.max_num_batched_tokens),
            "--host", LOOPBACK, "--port", str(port),
            "--enable-metrics",
        ]
        kv = self.kv_dtype_flag_value(r.kv_cache_dtype)
        if kv != "auto":
            argv += ["--kv-cache-dtype", kv]
        if p.data_parallel > 1:
            argv += ["--dp", str(p.data_parallel)]
            if p.dp_attention:
                argv += ["--enable-dp-attention"]
        if p.expert_parallel:
            argv += ["--ep-size", str(r.tensor_parallel)]
        argv += r.quirk_flags
        if engine.speculative == "eagle3":
            argv += ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", DRAFT_MOUNT,
                     "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
                     "--speculative-num-draft-tokens", "4"]
        return argv

    def weights_per_device(self, r: Resolved) -> int:
        p = r.spec.parallelism
        if p.dp_attention:
            # DP attention replicates the attention projections inside each DP group.
            attention = catalog.KIMI_K26.attention_params * catalog.BF16_BYTES
            return (r.checkpoint.size_bytes - attention) // r.tensor_parallel + attention * p.data_parallel // r.tensor_parallel
        return super().weights_per_device(r)

    def kv_sharing(self, r: Resolved) -> tuple[int, int]:
        # A sequence lives on one rank group; DP attention groups or plain DP replicas: one pool each.
        return 1, r.spec.parallelism.data_parallel

    def attention_groups(self, r: Resolved) -> int:
        p = r.spec.parallelism
        return p.data_parallel if p.dp_attention else 1
