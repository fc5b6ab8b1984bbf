"""vLLM model implementations of LLaDA and Dream."""
