"""Pure-PyTorch reference of LLaDA and Dream (forward + official generation), and
of each cache policy's generation (``fast_dllm_cache``, ``dkv_cache``,
``freecache``), of parallel decoding (``parallel_decoding``), of Fast-dLLM's
block-wise Dream (``fast_dllm_dream``) and of DARE with reuse on
(``dare_generation``).

Readable, unoptimised, and independent of vLLM: the oracle for the engine's exact
mode, for the benchmark harness and for the training script. It is itself checked
against ``transformers``' ``LlamaModel`` / ``Qwen2Model`` run with a full
non-causal mask (see ``tests/test_reference_model.py``).
"""

from vllm_dare.reference.generation import dream_generate, llada_generate
from vllm_dare.reference.modeling import ReferenceDLLM, load_reference_model

__all__ = ["ReferenceDLLM", "dream_generate", "llada_generate", "load_reference_model"]
