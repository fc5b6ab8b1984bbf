"""Serving-side helpers for `vllm serve`."""
