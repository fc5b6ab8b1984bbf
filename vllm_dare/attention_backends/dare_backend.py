"""The DARE attention backend (``--attention-backend dare``).

Per layer it keeps, in vLLM's paged KV cache (sized and allocated by vLLM's KV cache
manager through the layer's cache spec), up to four rows per token slot: K, V, the
attention output O and the reference query Q_ref (``dare_cache_layout.py``; the
engine's ``max_mode`` decides whether O and Q_ref are kept). The
reuse decision and the skipped work live in ``dare_attention.py`` and the Triton
kernels of ``triton_dare_kernels.py``.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import ClassVar

import torch

from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout
from vllm_dare.attention_backends.dare_metadata import DareMetadata, full_sequence_len
from vllm_dare.vllm_compat import classes_by_name


class DareMetadataBuilder(AttentionMetadataBuilder[DareMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> DareMetadata:
        m = common_attn_metadata
        causal = m.causal
        if isinstance(causal, torch.Tensor):
            causal = bool(causal.any())
        query_lens = m.query_start_loc_cpu[1:] - m.query_start_loc_cpu[:-1]
        token_req = torch.repeat_interleave(
            torch.arange(m.num_reqs, dtype=torch.int32), query_lens[: m.num_reqs]
        ).to(m.query_start_loc.device, non_blocking=True)
        return DareMetadata(
            num_actual_tokens=m.num_actual_tokens,
            num_reqs=m.num_reqs,
            query_start_loc=m.query_start_loc,
            seq_lens=m.seq_lens[: m.num_reqs].to(torch.int32),
            block_table=m.block_table_tensor[: m.num_reqs].to(torch.int32),
            slot_mapping=m.slot_mapping[: m.num_actual_tokens].to(torch.int64),
            token_req=token_req,
            causal=bool(causal),
            max_query_len=m.max_query_len,
            full_sequence_len=full_sequence_len(query_lens[: m.num_reqs], m.num_actual_tokens,
                                                m.max_seq_len),
        )


class DareAttentionImpl(AttentionImpl):
    # The cache rows besides K/V (set per backend class, ``dare_backend_for``).
    has_o: ClassVar[bool] = True
    has_qref: ClassVar[bool] = True

    """Plain forward (every row recomputed) for callers that hand over full
    Q/K/V through vLLM's ``Attention`` op. The models of this package call
    ``dare_attention.dare_self_attention`` instead, which can skip work."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None,
                 sliding_window=None, kv_cache_dtype="auto", logits_soft_cap=None,
                 attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None, **kw):
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap:
            raise ValueError("DARE supports plain softmax attention only")
        if attn_type != AttentionType.DECODER:
            raise ValueError("DARE supports decoder self-attention only")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads or num_heads
        self.layout = DareCacheLayout(num_heads, self.num_kv_heads, head_size,
                                      has_o=self.has_o, has_qref=self.has_qref)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None,
                output_scale=None, output_block_scale=None):
        from vllm_dare.attention_backends.dare_layer_step import attend_all_rows

        if attn_metadata is None:  # profiling run
            return output.fill_(0) if output is not None else torch.zeros_like(query)
        out = attend_all_rows(query, key, value, kv_cache, attn_metadata, self.layout,
                              self.scale)
        if output is None:
            return out
        output[: out.shape[0]].copy_(out.view(output[: out.shape[0]].shape))
        return output


class DareAttentionBackend(AttentionBackend):
    """Backend for one query-to-KV head ratio (the cache rows hold O and Q_ref,
    which have num_heads, not num_kv_heads, heads) and one set of cache rows."""

    queries_per_kv: ClassVar[int] = 1
    has_o: ClassVar[bool] = True
    has_qref: ClassVar[bool] = True
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @classmethod
    def get_impl_cls(cls):
        return _impl_for(cls.has_o, cls.has_qref)

    @staticmethod
    def get_builder_cls():
        return DareMetadataBuilder

    @classmethod
    def supports_non_causal(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Token-major block interiors: a token slot's rows are contiguous.
        return (KVCacheLayout.LBNHC, KVCacheLayout.BLNHC)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        # Per kv head and token: K and V (head_size each) plus this head's share
        # of O and Q_ref, as far as they are kept (queries_per_kv * head_size each).
        query_rows = int(cls.has_o) + int(cls.has_qref)
        elements = spec.head_size * (2 + query_rows * cls.queries_per_kv)
        dtype_size = torch.tensor([], dtype=spec.dtype).element_size()
        return replace(spec, state_content_bytes=elements * dtype_size)

    @classmethod
    def validate_configuration(cls, *args, **kwargs) -> list[str]:
        # vllm-dare's models (LLaDA, Dream) take the DARE backend class directly and
        # clear the engine-wide selection, so reaching vLLM's backend selection with
        # "DARE" means another model asked for it.
        return [
            "the DARE backend (vllm-dare) serves LLaDA and Dream checkpoints only "
            "(architectures LLaDAModelLM, DreamModel)"
        ]


# Backend class names say which rows the cache keeps besides K and V.
_ROWS = {(True, True): "oq", (False, True): "q", (False, False): "kv"}


@lru_cache(maxsize=None)
def _impl_for(has_o: bool, has_qref: bool) -> type[DareAttentionImpl]:
    return type(f"DareAttentionImpl_{_ROWS[has_o, has_qref]}", (DareAttentionImpl,),
                {"has_o": has_o, "has_qref": has_qref, "__module__": __name__})


def dare_backend_for(queries_per_kv: int, has_o: bool = True, has_qref: bool = True
                     ) -> type[DareAttentionBackend]:
    """The backend class of a layer (one class per head ratio and cache rows; its
    name, which vLLM may pickle, resolves in any process through this module's
    ``__getattr__``: ``vllm_compat.classes_by_name``)."""
    return _backend_class(int(queries_per_kv), bool(has_o), bool(has_qref))


@lru_cache(maxsize=None)
def _backend_class(queries_per_kv: int, has_o: bool, has_qref: bool
                   ) -> type[DareAttentionBackend]:
    return type(
        f"DareAttentionBackend_{queries_per_kv}_{_ROWS[has_o, has_qref]}",
        (DareAttentionBackend,),
        {"queries_per_kv": queries_per_kv, "has_o": has_o, "has_qref": has_qref,
         "__module__": __name__},
    )


def _backend_named(suffix: str) -> type[DareAttentionBackend] | None:
    ratio, _, rows = suffix.partition("_")
    flags = {v: k for k, v in _ROWS.items()}.get(rows or "oq")
    if ratio.isdigit() and flags is not None:
        return dare_backend_for(int(ratio), *flags)
    return None


def _impl_named(suffix: str) -> type[DareAttentionImpl] | None:
    flags = {v: k for k, v in _ROWS.items()}.get(suffix)
    return None if flags is None else _impl_for(*flags)


__getattr__ = classes_by_name(__name__, {"DareAttentionBackend_": _backend_named,
                                         "DareAttentionImpl_": _impl_named})
