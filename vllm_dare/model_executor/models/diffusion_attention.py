"""Bidirectional self-attention shared by LLaDA and Dream, with the DARE path.

Without DARE it is vLLM's usual fused-QKV attention (``self.attn(q, k, v)``) run
non-causally. With ``--attention-backend dare`` the projections are loaded as two
layers, ``q_proj`` and a fused ``kv_proj``: the layer computes the query of every
token, lets ``dare_self_attention`` decide which tokens' keys/values and attention
outputs are reused, and runs ``kv_proj`` and ``o_proj`` on the recomputed tokens
only (the DARE cache holds a token's attention output after ``o_proj``).
"""

from __future__ import annotations

import torch
from torch import nn

from vllm.config import CacheConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding, get_rope

from vllm_dare.attention_backends.dare_attention import dare_self_attention
from vllm_dare.attention_backends.dare_backend import dare_backend_for
from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout
from vllm_dare.attention_backends.dare_layer_step import DareProjections, DareRuntime


class DiffusionSelfAttention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        rope_parameters: dict,
        max_position: int,
        qkv_bias: bool,
        rope_full_precision: bool,
        layer_index: int,
        dare_runtime: DareRuntime | None = None,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        assert num_heads % tp_size == 0
        if num_kv_heads >= tp_size:
            assert num_kv_heads % tp_size == 0
        else:
            assert tp_size % num_kv_heads == 0
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.head_dim = hidden_size // num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.layer_index = layer_index
        self.dare_runtime = dare_runtime

        if dare_runtime is None:
            self.qkv_proj = QKVParallelLinear(
                hidden_size, self.head_dim, num_heads, num_kv_heads, bias=qkv_bias,
                quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
            )
        else:
            if quant_config is not None:
                # The recomputed-rows kernels read the projections' weights as
                # they are.
                raise ValueError("the DARE backend needs unquantized attention weights")
            if tp_size != 1:
                # The query delta is taken over all heads of a token, and the O
                # cache holds the projected (all-reduced) output row: both need
                # the whole layer on one rank.
                raise ValueError("the DARE backend supports tensor_parallel_size 1 only")
            if hidden_size != num_heads * self.head_dim:
                raise ValueError("the DARE backend needs hidden_size == num_heads * head_dim "
                                 "(its O cache rows hold the projected output)")
            self.q_proj = ColumnParallelLinear(
                hidden_size, num_heads * self.head_dim, bias=qkv_bias,
                quant_config=quant_config, prefix=f"{prefix}.q_proj",
            )
            self.kv_proj = MergedColumnParallelLinear(
                hidden_size, [num_kv_heads * self.head_dim] * 2, bias=qkv_bias,
                quant_config=quant_config, prefix=f"{prefix}.kv_proj",
            )
        self.o_proj = RowParallelLinear(
            num_heads * self.head_dim, hidden_size, bias=False,
            quant_config=quant_config, prefix=f"{prefix}.o_proj",
        )
        self.rope_full_precision = rope_full_precision
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=max_position,
            is_neox_style=True,
            rope_parameters=rope_parameters,
            dtype=torch.float32 if rope_full_precision else None,
        )
        backend = None
        if dare_runtime is not None:
            if not (isinstance(self.rotary_emb, RotaryEmbedding)
                    and self.rotary_emb.rotary_dim == self.head_dim
                    and self.rotary_emb.is_neox_style):
                # The recomputed-rows K/V kernel applies RoPE from the cos/sin cache
                # of vLLM's rotate-half embedding over the whole head.
                raise ValueError(
                    f"the DARE backend supports full-head rotate-half RoPE only, got "
                    f"{type(self.rotary_emb).__name__} over {self.rotary_emb.rotary_dim} "
                    f"of {self.head_dim} dimensions")
            self.layout = DareCacheLayout.for_max_mode(
                self.num_heads, self.num_kv_heads, self.head_dim, dare_runtime.max_mode)
            backend = dare_backend_for(self.num_heads // self.num_kv_heads,
                                       self.layout.has_o, self.layout.has_qref)
        self.attn = Attention(
            self.num_heads, self.head_dim, self.scale, num_kv_heads=self.num_kv_heads,
            cache_config=cache_config, quant_config=quant_config,
            prefix=f"{prefix}.attn", attn_backend=backend,
        )

    def _rope(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None):
        if not self.rope_full_precision:
            return self.rotary_emb(positions, q, k)
        dtype = q.dtype
        q, k = self.rotary_emb(positions, q.float(), None if k is None else k.float())
        return q.to(dtype), None if k is None else k.to(dtype)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.dare_runtime is None:
            qkv, _ = self.qkv_proj(hidden_states)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q, k = self._rope(positions, q, k)
            out = self.attn(q, k, v)
            output, _ = self.o_proj(out)
            return output
        return self._dare_forward(positions, hidden_states)

    def _dare_forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, _ = self.q_proj(x)
        q, _ = self._rope(positions, q, None)

        def project_kv(rows: torch.Tensor | slice):
            kv, _ = self.kv_proj(x[rows])
            k, v = kv.split([self.kv_size, self.kv_size], dim=-1)
            k, _ = self._rope(positions[rows], k.contiguous(), None)
            return k, v  # a strided view: the cache write takes any row stride

        def project_o(attn_rows: torch.Tensor) -> torch.Tensor:
            out, _ = self.o_proj(attn_rows)
            return out

        kv_weight, o_weight = _plain_weight(self.kv_proj), _plain_weight(self.o_proj)
        proj = DareProjections(
            project_kv, project_o, x, kv_weight, self.kv_proj.bias if kv_weight is not None
            else None, o_weight, positions, self.rotary_emb.cos_sin_cache,
        )
        return dare_self_attention(
            self.attn.layer_name, self.layer_index, self.dare_runtime, self.layout,
            self.scale, q, proj,
        )


def _plain_weight(layer: nn.Module) -> torch.Tensor | None:
    """The layer's ``[out, in]`` weight, or None where vLLM's platform keeps none
    (its CPU build moves unquantized weights into a prepacked GEMM handle and
    leaves an empty parameter)."""
    weight = layer.weight
    return weight if weight.dim() == 2 and weight.numel() else None
