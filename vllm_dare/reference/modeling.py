"""Reference forward pass of LLaDA and Dream in plain PyTorch.

Both are pre-norm decoders with bidirectional attention over the whole sequence.
The module keeps the checkpoint's own tensor names so a checkpoint folder loads
without renaming; the math follows the official modelling code (LLaDA's
``modeling_llada.py``, Dream's ``modeling_dream.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file


@dataclass(frozen=True)
class ArchSpec:
    """Shape and numerics of one checkpoint, read from its config.json."""

    family: str  # "llada" or "dream"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    mask_token_id: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, config: dict) -> ArchSpec:
        if config["model_type"] == "llada":
            return cls(
                family="llada",
                hidden_size=config["d_model"],
                num_layers=config["n_layers"],
                num_heads=config["n_heads"],
                num_kv_heads=config.get("n_kv_heads") or config["n_heads"],
                intermediate_size=config["mlp_hidden_size"],
                vocab_size=config.get("embedding_size") or config["vocab_size"],
                rope_theta=config["rope_theta"],
                rms_norm_eps=config["rms_norm_eps"],
                mask_token_id=config["mask_token_id"],
            )
        if config["model_type"] == "Dream":
            return cls(
                family="dream",
                hidden_size=config["hidden_size"],
                num_layers=config["num_hidden_layers"],
                num_heads=config["num_attention_heads"],
                num_kv_heads=config["num_key_value_heads"],
                intermediate_size=config["intermediate_size"],
                vocab_size=config["vocab_size"],
                rope_theta=config["rope_theta"],
                rms_norm_eps=config["rms_norm_eps"],
                mask_token_id=config["mask_token_id"],
            )
        raise ValueError(f"not a LLaDA or Dream config: {config['model_type']!r}")


def _weight_names(family: str, layer: int) -> dict[str, str]:
    """Checkpoint names of one decoder layer's tensors."""
    if family == "llada":
        p = f"model.transformer.blocks.{layer}."
        return {
            "attn_norm": p + "attn_norm.weight",
            "q": p + "q_proj.weight",
            "k": p + "k_proj.weight",
            "v": p + "v_proj.weight",
            "o": p + "attn_out.weight",
            "mlp_norm": p + "ff_norm.weight",
            "gate": p + "ff_proj.weight",
            "up": p + "up_proj.weight",
            "down": p + "ff_out.weight",
        }
    p = f"model.layers.{layer}."
    return {
        "attn_norm": p + "input_layernorm.weight",
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "q_bias": p + "self_attn.q_proj.bias",
        "k_bias": p + "self_attn.k_proj.bias",
        "v_bias": p + "self_attn.v_proj.bias",
        "o": p + "self_attn.o_proj.weight",
        "mlp_norm": p + "post_attention_layernorm.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }


def _top_names(family: str) -> dict[str, str]:
    if family == "llada":
        return {
            "embed": "model.transformer.wte.weight",
            "final_norm": "model.transformer.ln_f.weight",
            "lm_head": "model.transformer.ff_out.weight",
        }
    return {
        "embed": "model.embed_tokens.weight",
        "final_norm": "model.norm.weight",
        "lm_head": "lm_head.weight",
    }


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float):
    """cos/sin in fp32, NeoX layout (cat(freqs, freqs))."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    )
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class ReferenceDLLM:
    """Whole-sequence bidirectional forward of a LLaDA or Dream checkpoint.

    ``logits(input_ids)`` returns the logits the official generation code reads:
    for Dream they are already shifted by one position (row i comes from the
    hidden state at i-1, row 0 from itself).
    """

    def __init__(self, spec: ArchSpec, weights: dict[str, torch.Tensor]):
        self.spec = spec
        self.w = weights
        names = _top_names(spec.family)
        self.embed = weights[names["embed"]]
        self.final_norm = weights[names["final_norm"]]
        self.lm_head = weights[names["lm_head"]]
        self.layers = [
            {
                key: weights[name]
                for key, name in _weight_names(spec.family, i).items()
            }
            for i in range(spec.num_layers)
        ]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def _qkv(self, x: torch.Tensor, layer: dict, cos, sin):
        """Query, key and value of ``x [..., T, hidden]`` after RoPE, heads first:
        ``[..., heads, T, head_dim]``."""
        s = self.spec
        *lead, T, _ = x.shape
        q = x @ layer["q"].T
        k = x @ layer["k"].T
        v = x @ layer["v"].T
        if s.family == "dream":
            q = q + layer["q_bias"]
            k = k + layer["k_bias"]
            v = v + layer["v_bias"]
        q = q.view(*lead, T, s.num_heads, s.head_dim).transpose(-2, -3)
        k = k.view(*lead, T, s.num_kv_heads, s.head_dim).transpose(-2, -3)
        v = v.view(*lead, T, s.num_kv_heads, s.head_dim).transpose(-2, -3)
        if s.family == "llada":
            # rope_full_precision: rotate in fp32, cast back.
            qf, kf = q.float(), k.float()
            q = (qf * cos + rotate_half(qf) * sin).to(q.dtype)
            k = (kf * cos + rotate_half(kf) * sin).to(k.dtype)
        else:
            c, sn = cos.to(q.dtype), sin.to(q.dtype)
            q = q * c + rotate_half(q) * sn
            k = k * c + rotate_half(k) * sn
        return q, k, v

    def _attend(self, q, k, v, layer: dict) -> torch.Tensor:
        """Every query of ``q`` over all of ``k``/``v`` (no mask), then ``o``."""
        s = self.spec
        *lead, _, T, _ = q.shape
        group = s.num_heads // s.num_kv_heads
        k = k.repeat_interleave(group, dim=-3)
        v = v.repeat_interleave(group, dim=-3)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(s.head_dim)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs @ v).transpose(-2, -3).reshape(*lead, T, s.num_heads * s.head_dim)
        return out @ layer["o"].T

    def _attention(self, x: torch.Tensor, layer: dict, cos, sin) -> torch.Tensor:
        """Bidirectional self-attention of ``x [..., T, hidden]``."""
        return self._attend(*self._qkv(x, layer, cos, sin), layer)

    def _mlp(self, x: torch.Tensor, layer: dict) -> torch.Tensor:
        h = rms_norm(x, layer["mlp_norm"], self.spec.rms_norm_eps)
        gate = h @ layer["gate"].T
        up = h @ layer["up"].T
        return x + (torch.nn.functional.silu(gate) * up) @ layer["down"].T

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states: ``[..., T] -> [..., T, hidden]``."""
        s = self.spec
        positions = torch.arange(input_ids.shape[-1])
        cos, sin = rope_tables(positions, s.head_dim, s.rope_theta)
        x = self.embed[input_ids]
        for layer in self.layers:
            h = rms_norm(x, layer["attn_norm"], s.rms_norm_eps)
            x = self._mlp(x + self._attention(h, layer, cos, sin), layer)
        return rms_norm(x, self.final_norm, s.rms_norm_eps)

    def new_kv_cache(self, length: int) -> list[list[torch.Tensor]]:
        """Per layer ``[K, V]`` of a ``length``-token sequence, ``[kv_heads, length,
        head_dim]`` each (K after RoPE), for ``cached_hidden_states``."""
        s = self.spec
        shape = (s.num_kv_heads, length, s.head_dim)
        return [[torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)]
                for _ in range(s.num_layers)]

    @torch.no_grad()
    def cached_hidden_states(self, input_ids: torch.Tensor, fed: torch.Tensor,
                             kv_cache: list[list[torch.Tensor]],
                             attend: int | None = None) -> torch.Tensor:
        """A forward that feeds only the positions ``fed`` of the sequence
        ``input_ids [T]``: their K/V are computed and written into ``kv_cache``,
        and they attend to the cache's keys at ``0 .. attend - 1`` (default all),
        where positions not fed keep what earlier forwards wrote. Returns the
        final-norm hidden states of the fed positions ``[len(fed), hidden]``."""
        s = self.spec
        attend = input_ids.shape[-1] if attend is None else attend
        cos, sin = rope_tables(fed, s.head_dim, s.rope_theta)
        x = self.embed[input_ids[fed]]
        for layer, (K, V) in zip(self.layers, kv_cache):
            h = rms_norm(x, layer["attn_norm"], s.rms_norm_eps)
            q, k, v = self._qkv(h, layer, cos, sin)
            K[:, fed] = k
            V[:, fed] = v
            x = self._mlp(x + self._attend(q, K[:, :attend], V[:, :attend], layer), layer)
        return rms_norm(x, self.final_norm, s.rms_norm_eps)

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits of hidden rows, in fp32."""
        return (hidden @ self.lm_head.T).float()

    def forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., T] -> [..., T, vocab]`` as generation reads them (Dream's
        row i comes from the hidden state at i-1, row 0 from itself). Differentiable:
        the training script uses it with weights that require grad."""
        logits = (self.hidden_states(input_ids) @ self.lm_head.T).float()
        if self.spec.family == "dream":
            logits = torch.cat([logits[..., :1, :], logits[..., :-1, :]], dim=-2)
        return logits

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of one sequence ``[T] -> [T, vocab]`` (no grad)."""
        return self.forward_logits(input_ids)


def load_reference_model(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> ReferenceDLLM:
    """Load a checkpoint folder (config.json + *.safetensors) into the reference."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    weights = {k: v.to(dtype) for k, v in weights.items()}
    return ReferenceDLLM(ArchSpec.from_config(config), weights)
