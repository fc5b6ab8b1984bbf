"""Hugging Face config class for LLaDA checkpoints (``model_type: llada``).

Official LLaDA checkpoints ship an OLMo-style config read by remote code. This class
reads the same ``config.json`` without ``trust_remote_code`` and exposes the
Llama-style names vLLM's generic code asks for (``hidden_size``,
``num_key_value_heads``, ``intermediate_size``, ``max_position_embeddings``,
``head_dim``, ``rope_parameters``).

Every field of the official config is declared with the official value as default,
so a config that omits a field still describes LLaDA, never OLMo's defaults.
"""

from transformers import PretrainedConfig

from vllm_dare.configs.diffusion_defaults import DEFAULT_CANVAS_LENGTH


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "mlp_hidden_size",
        "max_position_embeddings": "max_sequence_length",
    }

    activation_type: str = "silu"
    alibi: bool = False
    alibi_bias_max: float = 8.0
    attention_dropout: float = 0.0
    attention_layer_norm: bool = False
    attention_layer_norm_with_affine: bool = True
    bias_for_layer_norm: bool = False
    block_group_size: int = 1
    block_type: str = "llama"
    d_model: int = 4096
    embedding_dropout: float = 0.0
    embedding_size: int | None = 126464
    flash_attention: bool = False
    include_bias: bool = False
    include_qkv_bias: bool = False
    init_cutoff_factor: float | None = None
    init_device: str | None = "meta"
    init_fn: str = "mitchell"
    init_std: float = 0.02
    input_emb_norm: bool = False
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    mask_token_id: int = 126336
    max_sequence_length: int = 4096
    mlp_hidden_size: int | None = 12288
    mlp_ratio: int = 4
    multi_query_attention: bool | None = None
    n_heads: int = 32
    n_kv_heads: int | None = None
    n_layers: int = 32
    precision: str | None = "amp_bf16"
    residual_dropout: float = 0.0
    rms_norm_eps: float = 1e-5
    rope: bool = True
    rope_full_precision: bool = True
    rope_theta: float = 500000.0
    scale_logits: bool = False
    use_cache: bool = False
    vocab_size: int = 126464
    weight_tying: bool = False
    pad_token_id: int | None = 126081
    eos_token_id: int | list[int] | None = 126081
    bos_token_id: int | None = 126080
    # Not an official field: the longest generation (masked canvas) vLLM serves.
    # Its presence marks the model as a diffusion model for vLLM.
    canvas_length: int | None = DEFAULT_CANVAS_LENGTH

    def __post_init__(self, **kwargs):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = self.mlp_ratio * self.d_model
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        self.tie_word_embeddings = bool(self.weight_tying)
        self.head_dim = self.d_model // self.n_heads
        self.hidden_act = self.activation_type
        self.rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """LLaDA variants this project can serve (the official 8B layout)."""
        unsupported = {
            "alibi": self.alibi,
            "rope": not self.rope,
            "weight_tying": self.weight_tying,
            "include_bias": self.include_bias,
            "include_qkv_bias": self.include_qkv_bias,
            "attention_layer_norm": self.attention_layer_norm,
            "input_emb_norm": self.input_emb_norm,
            "scale_logits": self.scale_logits,
        }
        bad = [name for name, on in unsupported.items() if on]
        if self.block_type != "llama":
            bad.append(f"block_type={self.block_type!r}")
        if self.layer_norm_type != "rms":
            bad.append(f"layer_norm_type={self.layer_norm_type!r}")
        if self.activation_type != "silu":
            bad.append(f"activation_type={self.activation_type!r}")
        if bad:
            raise ValueError(
                "This LLaDA config uses options vllm-dare does not implement: "
                + ", ".join(bad)
            )
        if self.d_model % self.n_heads != 0:
            raise ValueError("d_model must be divisible by n_heads")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError("n_heads must be divisible by n_kv_heads")
