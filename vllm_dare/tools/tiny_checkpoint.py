"""Write small LLaDA / Dream checkpoint folders in the official formats.

A folder holds ``config.json`` (every field of the official release's config, with
small sizes and small special-token ids), ``generation_config.json``,
``model.safetensors`` with the official tensor names, and a working character-level
``tokenizer.json`` (+ ``tokenizer_config.json`` with the special tokens and the
official chat template). Used by the tests, the examples and the training script.

    python -m vllm_dare.tools.tiny_checkpoint llada /tmp/tiny-llada
"""

from __future__ import annotations

import argparse
import json
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_dare.tools.chat_templates import DREAM_CHAT_TEMPLATE, LLADA_CHAT_TEMPLATE

SHARED_CONFIGS = {
    "llada": "llada-8b-instruct",
    "dream": "dream-v0-instruct-7b",
}

# Special tokens first, at small ids, then one token per character.
LLADA_SPECIALS = [
    "<|startoftext|>",  # bos
    "<|endoftext|>",  # eos = pad
    "<|mdm_mask|>",  # mask
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
DREAM_SPECIALS = [
    "<|endoftext|>",  # eos = pad = bos
    "<|mask|>",
    "<|beginoftext|>",
    "<|im_start|>",
    "<|im_end|>",
]
CHARACTERS = list(string.digits + string.ascii_letters + string.punctuation + " \n")


@dataclass(frozen=True)
class TinySize:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: MHA for LLaDA, 2 for Dream
    intermediate_size: int = 128
    vocab_size: int = 128
    max_length: int = 1024


def _official_config(family: str) -> dict:
    """The official config.json, embedded so the tool works from an installed wheel."""
    return json.loads(OFFICIAL_CONFIGS[family])


def vocabulary(family: str) -> list[str]:
    specials = LLADA_SPECIALS if family == "llada" else DREAM_SPECIALS
    return specials + CHARACTERS


def build_config(family: str, size: TinySize) -> dict:
    config = _official_config(family)
    vocab = vocabulary(family)
    if size.vocab_size < len(vocab):
        raise ValueError(f"vocab_size must be >= {len(vocab)}")
    if family == "llada":
        config.update(
            d_model=size.hidden_size,
            n_layers=size.num_layers,
            n_heads=size.num_heads,
            n_kv_heads=size.num_kv_heads or size.num_heads,
            mlp_hidden_size=size.intermediate_size,
            vocab_size=size.vocab_size,
            embedding_size=size.vocab_size,
            max_sequence_length=size.max_length,
            mask_token_id=2,
            eos_token_id=1,
            pad_token_id=1,
        )
    else:
        config.update(
            hidden_size=size.hidden_size,
            num_hidden_layers=size.num_layers,
            max_window_layers=size.num_layers,
            num_attention_heads=size.num_heads,
            num_key_value_heads=size.num_kv_heads or 2,
            intermediate_size=size.intermediate_size,
            vocab_size=size.vocab_size,
            max_position_embeddings=size.max_length,
            mask_token_id=1,
            eos_token_id=0,
            pad_token_id=0,
            bos_token_id=0,
        )
    return config


def build_generation_config(family: str) -> dict:
    if family == "llada":
        return {"bos_token_id": 0, "eos_token_id": 1, "transformers_version": "4.46.3"}
    return {
        "alg": "origin",
        "alg_temp": None,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "eps": 0.001,
        "mask_token_id": None,
        "output_history": False,
        "pad_token_id": 0,
        "steps": 512,
        "temperature": 0.0,
        "top_k": None,
        "top_p": None,
        "transformers_version": "4.46.2",
    }


def weight_shapes(family: str, config: dict) -> dict[str, tuple[int, ...]]:
    """Official tensor names and shapes for ``config``."""
    if family == "llada":
        d, v, f = config["d_model"], config["embedding_size"], config["mlp_hidden_size"]
        head = d // config["n_heads"]
        kv = config["n_kv_heads"] * head
        shapes = {
            "model.transformer.wte.weight": (v, d),
            "model.transformer.ln_f.weight": (d,),
            "model.transformer.ff_out.weight": (v, d),
        }
        for i in range(config["n_layers"]):
            p = f"model.transformer.blocks.{i}."
            shapes.update(
                {
                    p + "attn_norm.weight": (d,),
                    p + "q_proj.weight": (d, d),
                    p + "k_proj.weight": (kv, d),
                    p + "v_proj.weight": (kv, d),
                    p + "attn_out.weight": (d, d),
                    p + "ff_norm.weight": (d,),
                    p + "ff_proj.weight": (f, d),
                    p + "up_proj.weight": (f, d),
                    p + "ff_out.weight": (d, f),
                }
            )
        return shapes
    d, v, f = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    head = d // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head
    shapes = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (v, d),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (d, d),
                p + "self_attn.q_proj.bias": (d,),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (d, d),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
            }
        )
    return shapes


def random_weights(
    family: str, config: dict, seed: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Random weights with well-separated logits (few near-ties under greedy)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in weight_shapes(family, config).items():
        if len(shape) == 1:
            if name.endswith(".bias"):
                t = 0.1 * torch.randn(shape, generator=gen)
            else:
                t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif "wte" in name or "embed_tokens" in name:
            t = torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        weights[name] = t.to(dtype).contiguous()
    return weights


def write_tokenizer(family: str, path: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary(family)
    specials = LLADA_SPECIALS if family == "llada" else DREAM_SPECIALS
    unk = "\u2047"  # a character the tiny vocabulary maps unknown input to
    vocab = vocab + [unk]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    if family == "llada":
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            mask_token="<|mdm_mask|>",
            unk_token=unk,
            chat_template=LLADA_CHAT_TEMPLATE,
        )
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|beginoftext|>",
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            mask_token="<|mask|>",
            unk_token=unk,
            chat_template=DREAM_CHAT_TEMPLATE,
        )
    fast.save_pretrained(str(path))


def write_checkpoint(
    path: str | Path,
    family: str,
    size: TinySize = TinySize(),
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    weights: dict[str, torch.Tensor] | None = None,
    generation_overrides: dict | None = None,
) -> Path:
    """Write a checkpoint folder; ``weights`` (official names) default to random.
    ``generation_overrides`` replace keys of the official ``generation_config.json``
    (a value of ``None`` drops the key)."""
    if family not in SHARED_CONFIGS:
        raise ValueError(f"family must be 'llada' or 'dream', got {family!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = build_config(family, size)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = build_generation_config(family)
    for key, value in (generation_overrides or {}).items():
        if value is None:
            generation.pop(key, None)
        else:
            generation[key] = value
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if weights is None:
        weights = random_weights(family, config, seed, dtype)
    expected = weight_shapes(family, config)
    if set(weights) != set(expected):
        raise ValueError("weights do not match the official tensor names")
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(family, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(SHARED_CONFIGS))
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    size = TinySize(
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate_size,
    )
    out = write_checkpoint(
        args.path, args.family, size, seed=args.seed, dtype=getattr(torch, args.dtype)
    )
    print(out)


# The official config.json files (shared/configs), embedded verbatim.
OFFICIAL_CONFIGS = {
    "llada": """{
  "activation_type": "silu",
  "alibi": false,
  "alibi_bias_max": 8.0,
  "architectures": ["LLaDAModelLM"],
  "attention_dropout": 0.0,
  "attention_layer_norm": false,
  "attention_layer_norm_with_affine": true,
  "auto_map": {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    "AutoModel": "modeling_llada.LLaDAModelLM"
  },
  "bias_for_layer_norm": false,
  "block_group_size": 1,
  "block_type": "llama",
  "d_model": 4096,
  "embedding_dropout": 0.0,
  "embedding_size": 126464,
  "eos_token_id": 126081,
  "flash_attention": false,
  "include_bias": false,
  "include_qkv_bias": false,
  "init_cutoff_factor": null,
  "init_device": "meta",
  "init_fn": "mitchell",
  "init_std": 0.02,
  "input_emb_norm": false,
  "layer_norm_type": "rms",
  "layer_norm_with_affine": true,
  "mask_token_id": 126336,
  "max_sequence_length": 4096,
  "mlp_hidden_size": 12288,
  "mlp_ratio": 4,
  "model_type": "llada",
  "multi_query_attention": null,
  "n_heads": 32,
  "n_kv_heads": 32,
  "n_layers": 32,
  "pad_token_id": 126081,
  "precision": "amp_bf16",
  "residual_dropout": 0.0,
  "rms_norm_eps": 1e-05,
  "rope": true,
  "rope_full_precision": true,
  "rope_theta": 500000.0,
  "scale_logits": false,
  "transformers_version": "4.46.3",
  "use_cache": false,
  "vocab_size": 126464,
  "weight_tying": false
}""",
    "dream": """{
  "architectures": ["DreamModel"],
  "attention_dropout": 0.0,
  "auto_map": {
    "AutoConfig": "configuration_dream.DreamConfig",
    "AutoModel": "modeling_dream.DreamModel"
  },
  "bos_token_id": 151643,
  "eos_token_id": 151643,
  "hidden_act": "silu",
  "hidden_size": 3584,
  "initializer_range": 0.02,
  "intermediate_size": 18944,
  "mask_token_id": 151666,
  "max_position_embeddings": 131072,
  "max_window_layers": 28,
  "model_type": "Dream",
  "num_attention_heads": 28,
  "num_hidden_layers": 28,
  "num_key_value_heads": 4,
  "pad_token_id": 151643,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 1000000.0,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.46.2",
  "use_cache": true,
  "use_mrope": false,
  "use_sliding_window": false,
  "vocab_size": 152064
}""",
}

if __name__ == "__main__":
    main()
