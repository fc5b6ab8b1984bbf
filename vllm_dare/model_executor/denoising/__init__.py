"""Denoising inside vLLM: per-request knobs, the ModelState and the sampler that
runs the official LLaDA and Dream generation algorithms step by step."""
