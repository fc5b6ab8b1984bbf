"""The pure-PyTorch reference forward equals transformers' LlamaModel (LLaDA) and
Qwen2Model (Dream) run with a full non-causal attention mask."""

from __future__ import annotations

import json

import torch
from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

from vllm_dare.reference import load_reference_model


def _non_causal_mask(T: int) -> torch.Tensor:
    return torch.zeros(1, 1, T, T)  # additive mask: every token sees every token


def _llama_from_llada(path) -> LlamaModel:
    cfg = json.loads((path / "config.json").read_text())
    ref = load_reference_model(path)
    model = LlamaModel(
        LlamaConfig(
            vocab_size=cfg["embedding_size"],
            hidden_size=cfg["d_model"],
            intermediate_size=cfg["mlp_hidden_size"],
            num_hidden_layers=cfg["n_layers"],
            num_attention_heads=cfg["n_heads"],
            num_key_value_heads=cfg["n_kv_heads"],
            rms_norm_eps=cfg["rms_norm_eps"],
            rope_theta=cfg["rope_theta"],
            max_position_embeddings=cfg["max_sequence_length"],
            attention_bias=False,
            mlp_bias=False,
        )
    ).eval()
    w = ref.w
    state = {
        "embed_tokens.weight": w["model.transformer.wte.weight"],
        "norm.weight": w["model.transformer.ln_f.weight"],
    }
    rename = {
        "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj",
        "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj",
        "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
    }
    for i in range(cfg["n_layers"]):
        for src, dst in rename.items():
            state[f"layers.{i}.{dst}.weight"] = w[f"model.transformer.blocks.{i}.{src}.weight"]
    model.load_state_dict(state, strict=True)
    return model, ref, w["model.transformer.ff_out.weight"]


def _qwen2_from_dream(path) -> Qwen2Model:
    cfg = json.loads((path / "config.json").read_text())
    ref = load_reference_model(path)
    model = Qwen2Model(
        Qwen2Config(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg["num_key_value_heads"],
            rms_norm_eps=cfg["rms_norm_eps"],
            rope_theta=cfg["rope_theta"],
            max_position_embeddings=cfg["max_position_embeddings"],
        )
    ).eval()
    state = {k.removeprefix("model."): v for k, v in ref.w.items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    return model, ref, ref.w["lm_head.weight"]


def test_llada_reference_equals_transformers_llama(tiny_llada):
    model, ref, head = _llama_from_llada(tiny_llada)
    ids = torch.randint(0, 100, (37,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = model(input_ids=ids[None], attention_mask=_non_causal_mask(37)).last_hidden_state[0]
        causal = model(input_ids=ids[None]).last_hidden_state[0]
    ours = ref.hidden_states(ids)
    torch.testing.assert_close(ours, hf, rtol=1e-4, atol=1e-4)
    # The mask matters: a causal run is clearly different.
    assert (causal - ours).abs().max() > 1e-2
    torch.testing.assert_close(ref.logits(ids), (hf @ head.T).float(), rtol=1e-4, atol=1e-4)


def test_dream_reference_equals_transformers_qwen2_with_shift(tiny_dream):
    model, ref, head = _qwen2_from_dream(tiny_dream)
    ids = torch.randint(0, 100, (29,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf = model(input_ids=ids[None], attention_mask=_non_causal_mask(29)).last_hidden_state[0]
    torch.testing.assert_close(ref.hidden_states(ids), hf, rtol=1e-4, atol=1e-4)
    logits = (hf @ head.T).float()
    shifted = torch.cat([logits[:1], logits[:-1]])
    torch.testing.assert_close(ref.logits(ids), shifted, rtol=1e-4, atol=1e-4)
