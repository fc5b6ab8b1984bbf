"""Command-line tools shipped with vllm-dare."""
