"""Layout of DARE's per-layer paged cache.

Every token slot of a layer's cache holds its rows side by side, in the model
dtype: the key and value (``num_kv_heads * head_dim`` each), then, as far as the
engine's ``max_mode`` needs them, the attention output O and the reference query
Q_ref (``num_heads * head_dim`` each). O is kept when requests may reuse it
(``max_mode`` ``o`` or ``kv+o``), Q_ref when they may reuse anything (``max_mode``
not ``off``). The cache tensor is ``[num_blocks, block_size, width]``; slot ``s``
is row ``s`` of its ``[num_blocks * block_size, width]`` view, addressed through
vLLM's block tables and slot mapping like the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DareCacheLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    has_o: bool = True
    has_qref: bool = True

    def __post_init__(self):
        if self.has_o and not self.has_qref:
            raise ValueError("a DARE cache that keeps O rows keeps Q_ref rows too")

    @classmethod
    def for_max_mode(cls, num_heads: int, num_kv_heads: int, head_dim: int,
                     max_mode: str) -> DareCacheLayout:
        """The rows a cache needs when requests reuse at most ``max_mode``."""
        return cls(num_heads, num_kv_heads, head_dim, has_o=max_mode in ("o", "kv+o"),
                   has_qref=max_mode != "off")

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
        if not self.has_o:
            raise ValueError("this DARE cache keeps no O rows (its engine's max_mode "
                             "does not reuse O)")
        return 2 * self.kv_width

    @property
    def qref_offset(self) -> int:
        if not self.has_qref:
            raise ValueError("this DARE cache keeps no Q_ref rows (its engine's "
                             "max_mode is off)")
        return 2 * self.kv_width + (self.q_width if self.has_o else 0)

    @property
    def query_rows(self) -> int:
        """How many ``num_heads * head_dim`` rows (O, Q_ref) a slot holds."""
        return int(self.has_o) + int(self.has_qref)

    @property
    def width(self) -> int:
        """Elements per token slot."""
        return 2 * self.kv_width + self.query_rows * self.q_width
