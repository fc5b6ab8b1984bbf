"""Hugging Face config class for Dream checkpoints (``model_type: Dream``).

Dream's config is Qwen2's plus ``mask_token_id``; this class reads it without
``trust_remote_code``.
"""

from transformers import Qwen2Config

from vllm_dare.configs.diffusion_defaults import DEFAULT_CANVAS_LENGTH


class DreamConfig(Qwen2Config):
    model_type = "Dream"

    mask_token_id: int = 151666
    use_mrope: bool = False
    # Not an official field: the longest generation (masked canvas) vLLM serves.
    # Its presence marks the model as a diffusion model for vLLM.
    canvas_length: int | None = DEFAULT_CANVAS_LENGTH

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.head_dim = self.hidden_size // self.num_attention_heads
