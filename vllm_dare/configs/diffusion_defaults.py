"""Served-canvas default shared by the config classes."""

# Longest generation (max_tokens) served when neither config.json nor
# --diffusion-config says otherwise.
DEFAULT_CANVAS_LENGTH = 256
