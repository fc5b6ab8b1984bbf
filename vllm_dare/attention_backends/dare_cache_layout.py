"""Layout of DARE's per-layer paged cache.

Every token slot of a layer's cache holds four rows side by side, in the model
dtype: the key and value (``num_kv_heads * head_dim`` each), the attention output
O and the reference query Q_ref (``num_heads * head_dim`` each). The cache tensor is
``[num_blocks, block_size, width]``; slot ``s`` is row ``s`` of its
``[num_blocks * block_size, width]`` view, addressed through vLLM's block tables and
slot mapping like the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DareCacheLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def k_offset(self) -> int:
        return 0

    @property
    def v_offset(self) -> int:
        return self.kv_width

    @property
    def o_offset(self) -> int:
        return 2 * self.kv_width

    @property
    def qref_offset(self) -> int:
        return 2 * self.kv_width + self.q_width

    @property
    def width(self) -> int:
        """Elements per token slot."""
        return 2 * self.kv_width + 2 * self.q_width
