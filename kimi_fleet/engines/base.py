"""The interface every inference engine implements.

An engine module says how its command line reads, which KV dtypes and options it has, which flags
it manages, how its memory and KV are laid out over ranks and what its health route means. The
rest of kimi-fleet asks the engine through this interface and never compares engine names.
Facts (ports, health routes, menus, memory profile) live in the catalog's EngineProfile.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

from kimi_fleet import catalog

if TYPE_CHECKING:  # type-only: resolve imports the registry at run time
    from kimi_fleet.resolve import Resolved

#: Spec options of `engine:` that only some engines read (spec field name -> stack key).
ENGINE_OPTIONS = {
    "language_model_only": "engine.languageModelOnly",
    "mm_encoder_tp_mode": "engine.mmEncoderTpMode",
    "moe_backend": "engine.moeBackend",
}
#: Parallelism options that only some engines read (spec field name -> stack key).
PARALLELISM_OPTIONS = {
    "dp_attention": "parallelism.dpAttention",
    "decode_context_parallel": "parallelism.decodeContextParallel",
}


class Engine:
    name: ClassVar[str]
    #: Flag -> the stack field that sets it: extraArgs may not set these, in any spelling.
    managed_flags: ClassVar[dict[str, str]]
    #: Which of ENGINE_OPTIONS / PARALLELISM_OPTIONS this engine reads; the others are refused.
    options: ClassVar[frozenset[str]] = frozenset()
    #: Extra words for a refused option (e.g. what this engine uses instead).
    options_hint: ClassVar[str] = ""

    @property
    def profile(self) -> catalog.EngineProfile:
        return catalog.ENGINES[self.name]

    # --- layout ---------------------------------------------------------------------------------

    def data_parallel_gpu_factor(self, r: Resolved) -> int:
        """How many times DP multiplies the GPUs of one engine."""
        return r.spec.parallelism.data_parallel

    def mm_encoder_tp_mode(self, r: Resolved) -> str | None:
        """How the vision encoder is spread (None: a full copy per rank, the engine's only way)."""
        return None

    def problems(self, r: Resolved) -> Iterator[str]:
        """Layout problems only this engine has (each names the field, the value and why)."""
        return iter(())

    # --- command line ---------------------------------------------------------------------------

    def kv_dtype_flag_value(self, kv_dtype: str) -> str:
        return self.profile.kv_dtype_spelling.get(kv_dtype, kv_dtype)

    def argv(self, r: Resolved, port: int) -> list[str]:
        """The engine's command line, one argument per item, with the hardware quirk flags
        (r.quirk_flags) in place; the caller appends the checkpoint's flags and extraArgs."""
        raise NotImplementedError

    # --- memory model ---------------------------------------------------------------------------

    def weights_per_device(self, r: Resolved) -> int:
        return r.checkpoint.size_bytes // r.tensor_parallel

    def kv_sharing(self, r: Resolved) -> tuple[int, int]:
        """(ranks one sequence's KV is spread over, independent KV pools in one engine)."""
        return 1, 1

    def attention_groups(self, r: Resolved) -> int:
        """Groups of ranks that hold distinct KV: ranks inside a group hold the same latent KV."""
        return self.kv_sharing(r)[0]

    def reserve_per_device(self, r: Resolved) -> int:
        profile = self.profile
        return profile.in_budget_reserve_bytes + profile.activation_bytes_per_batched_token * r.max_num_batched_tokens
