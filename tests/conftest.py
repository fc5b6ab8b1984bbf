"""Shared fixtures: tiny checkpoints in the official formats and shared engines.

Engines run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on the CPU build with
the plugin's CPU mode. One engine lives at a time; tests of the same model share
it (test modules are ordered so that they do).
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

# The plugin's CPU mode, as vLLM applies it through the platform-plugin entry point,
# before any Triton kernel module is imported (a no-op on vLLM's CUDA build).
from vllm_dare.cpu_triton import enable_if_cpu_build  # noqa: E402

enable_if_cpu_build()

import pytest  # noqa: E402
import torch  # noqa: E402

from vllm_dare.tools.tiny_checkpoint import TinySize, write_checkpoint  # noqa: E402

MAX_MODEL_LEN = 256


@pytest.fixture(scope="session")
def tiny_llada(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny-llada"), "llada", seed=1)


@pytest.fixture(scope="session")
def tiny_llada_eos(tmp_path_factory):
    """A tiny LLaDA whose EOS logit copies (and beats) a frequent token's, so that
    generations contain EOS part-way through."""
    from vllm_dare.tools.tiny_checkpoint import build_config, random_weights

    config = build_config("llada", TinySize())
    weights = random_weights("llada", config, seed=1, dtype=torch.bfloat16)
    head = weights["model.transformer.ff_out.weight"]
    eos = config["eos_token_id"]
    frequent = 30  # the character most often predicted by the seed-1 model
    head[eos] = (head[frequent].float() * 1.05).to(head.dtype)
    return write_checkpoint(
        tmp_path_factory.mktemp("tiny-llada-eos"), "llada", weights=weights
    )


@pytest.fixture(scope="session")
def tiny_dream(tmp_path_factory):
    # Dream-7B has GQA (28 query heads, 4 kv heads): keep it grouped.
    size = TinySize(num_heads=4, num_kv_heads=2)
    return write_checkpoint(tmp_path_factory.mktemp("tiny-dream"), "dream", size, seed=2)


class _EnginePool:
    """Keeps at most one in-process engine alive, keyed by checkpoint path."""

    def __init__(self):
        self.key = None
        self.llm = None

    def get(self, path, **kwargs):
        key = (str(path), tuple(sorted(kwargs.items())))
        if key != self.key:
            self.close()
            from vllm import LLM

            settings = dict(dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN,
                            max_num_seqs=8, seed=0)
            self.llm = LLM(model=str(path), **{**settings, **kwargs})
            self.key = key
        return self.llm

    def close(self):
        if self.llm is not None:
            from vllm.distributed import cleanup_dist_env_and_memory

            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            self.key = None
            gc.collect()
            cleanup_dist_env_and_memory()


@pytest.fixture(scope="session")
def engines():
    pool = _EnginePool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def llada_engine(engines, tiny_llada):
    return lambda: engines.get(tiny_llada)


@pytest.fixture(scope="session")
def llada_eos_engine(engines, tiny_llada_eos):
    return lambda: engines.get(tiny_llada_eos)


@pytest.fixture(scope="session")
def dream_engine(engines, tiny_dream):
    return lambda: engines.get(tiny_dream)
