"""Storage for a layer step's row selection, shared by the layers of a forward."""

from __future__ import annotations

import torch


class RowSelectionScratch:
    """Storage for what ``decide_reuse`` and ``select_rows`` return, for a batch of
    ``num_tokens`` tokens in ``num_reqs`` requests. The layers of a forward select
    their rows one after another on one stream, so they can share one (the DARE
    runtime keeps one per step): a layer step then allocates nothing for its
    selection. The PyTorch ops, on the CPU, take it and allocate anyway."""

    def __init__(self, num_tokens: int, num_reqs: int, device: torch.device):
        self.num_tokens, self.num_reqs = num_tokens, num_reqs
        self.flags = torch.empty(num_tokens, 4, dtype=torch.int8, device=device)
        self.rows = torch.empty(2, num_tokens, dtype=torch.int64, device=device)
        self.req_row_start = torch.empty(2, num_reqs + 1, dtype=torch.int32, device=device)
        self.counts = torch.empty(2, dtype=torch.int32, device=device)
        self.prefix = torch.empty(2, num_tokens + 1, dtype=torch.int32, device=device)
