"""Step-level behaviour of the engine's denoisers on synthetic logits: transfer
schedules, remasking and sampling options (the greedy paths are compared with the
reference end to end in test_exact_mode.py)."""

from __future__ import annotations

import pytest
import torch

from vllm_dare.model_executor.denoising.denoisers import (
    DreamDenoiser,
    LLaDADenoiser,
    llada_transfer_counts,
)
from vllm_dare.model_executor.denoising.params import DenoisingDefaults, resolve_params

MASK = 2
VOCAB = 16


def _llada(gen, steps, block, **knobs):
    d = DenoisingDefaults(family="llada", mask_token_id=MASK, canvas_length=128)
    extra = {"dllm_steps": steps, "dllm_block_length": block, **knobs}
    return LLaDADenoiser(resolve_params(extra, gen, d), MASK, torch.device("cpu"))


def _dream(gen, steps, **knobs):
    d = DenoisingDefaults(family="dream", mask_token_id=MASK, canvas_length=128)
    extra = {"dllm_steps": steps, **knobs}
    return DreamDenoiser(resolve_params(extra, gen, d), MASK, torch.device("cpu"))


def _peaked_logits(gen, token=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(gen, VOCAB, generator=g)
    logits[:, token] += 50.0  # overwhelmingly likely, never the mask id
    return logits


@pytest.mark.parametrize("block,steps,expected", [(8, 8, [1] * 8), (8, 3, [3, 3, 2]), (4, 8, [1, 1, 1, 1, 0, 0, 0, 0])])
def test_llada_transfer_counts(block, steps, expected):
    assert llada_transfer_counts(block, steps) == expected
    assert sum(expected) == block


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_llada_fills_blocks_in_order_with_scheduled_counts(remasking, temperature):
    gen, steps, block = 16, 8, 4  # 4 blocks, 2 steps each: 2 tokens per step
    den = _llada(gen, steps, block, dllm_remasking=remasking, dllm_temperature=temperature)
    forwards = 0
    done = False
    while not done:
        before = (den.canvas != MASK).sum().item()
        done = den.step(_peaked_logits(gen, seed=forwards))
        forwards += 1
        filled = den.canvas != MASK
        assert filled.sum().item() - before == 2
        # Nothing beyond the current block is ever written.
        current_block = (forwards - 1) // 2
        assert not filled[(current_block + 1) * block :].any()
    assert forwards == steps
    assert (den.canvas == 5).all()


def test_llada_skips_steps_that_transfer_nothing():
    den = _llada(8, 16, 4)  # 2 blocks x 8 steps, 4 tokens per block: 4 empty steps each
    forwards = 0
    while not den.step(_peaked_logits(8)):
        forwards += 1
    assert forwards + 1 == 8  # only the steps that unmask something run a forward
    assert (den.canvas == 5).all()


def test_llada_gumbel_sampling_follows_the_distribution():
    # Two tokens with logits differing by log(3): at temperature 1 the Gumbel-max
    # pick is token 7 about 3 times in 4.
    torch.manual_seed(0)
    logits = torch.full((1, VOCAB), -1e4)
    logits[0, 7] = torch.log(torch.tensor(3.0))
    logits[0, 9] = 0.0
    picks = []
    for _ in range(400):
        den = _llada(1, 1, 1, dllm_temperature=1.0)
        den.step(logits)
        picks.append(int(den.canvas[0]))
    share = picks.count(7) / len(picks)
    assert set(picks) <= {7, 9}
    assert 0.68 < share < 0.82


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_confidence_algorithms_reveal_everything(alg):
    gen, steps = 12, 6
    den = _dream(gen, steps, dllm_alg=alg)
    forwards = 0
    done = False
    while not done:
        done = den.step(_peaked_logits(gen, seed=forwards))
        forwards += 1
    assert forwards <= steps
    assert (den.canvas == 5).all()


def test_dream_skips_a_first_step_that_transfers_nothing():
    """With as many steps as tokens the first step's count truncates to 0
    (32 x (1 - s/t) < 1): it runs no forward, and the steps that do run reveal
    everything."""
    gen = steps = 32
    den = _dream(gen, steps, dllm_alg="maskgit_plus")
    assert den.next_step == 1
    forwards = 0
    done = False
    while not done:
        before = int((den.canvas == den.mask_token_id).sum())
        done = den.step(_peaked_logits(gen, seed=forwards))
        assert int((den.canvas == den.mask_token_id).sum()) < before  # every step unmasks
        forwards += 1
    assert forwards < steps and (den.canvas == 5).all()
    assert _dream(gen, steps, dllm_alg="origin").next_step == 0  # origin has no count


def test_dream_origin_reveals_all_by_the_last_step():
    torch.manual_seed(0)
    gen, steps = 10, 4
    den = _dream(gen, steps, dllm_alg="origin")
    for i in range(steps):
        done = den.step(_peaked_logits(gen, seed=i))
        if done:
            break
    assert done and (den.canvas == 5).all()


def test_dream_alg_temp_and_top_k_sampling():
    torch.manual_seed(0)
    gen = 6
    den = _dream(gen, 3, dllm_alg="maskgit_plus", dllm_alg_temp=0.5,
                 dllm_temperature=1.0, dllm_top_k=1)
    logits = torch.randn(gen, VOCAB)
    logits[:, 11] = 10.0  # top-1 everywhere: top_k=1 forces it even when sampling
    done = False
    while not done:
        done = den.step(logits)
    assert (den.canvas == 11).all()


def test_dream_top_p_keeps_the_nucleus():
    torch.manual_seed(0)
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, 3] = 2.0
    logits[0, 4] = 1.9
    picks = set()
    for _ in range(50):
        den = _dream(1, 1, dllm_alg="maskgit_plus", dllm_temperature=1.0, dllm_top_p=0.3)
        den.step(logits)
        picks.add(int(den.canvas[0]))
    assert picks == {3}


def _ranked_logits(scores):
    """Logits whose greedy confidence at position j grows with ``scores[j]``."""
    logits = torch.zeros(len(scores), VOCAB)
    logits[:, 5] = torch.tensor(scores, dtype=torch.float32)
    return logits


def test_dream_candidates_limit_keeps_the_most_confident_still_masked():
    den = _dream(6, 3, dllm_alg="maskgit_plus")  # unmasks 1 token at the first step
    assert den.candidates(2).tolist() == [True] * 6  # no ranking before the first step
    den.step(_ranked_logits([1.0, 5.0, 3.0, 9.0, 2.0, 7.0]))
    assert (den.canvas != MASK).nonzero().squeeze(-1).tolist() == [3]
    assert den.candidates().tolist() == [True, True, True, False, True, True]
    assert den.candidates(2).nonzero().squeeze(-1).tolist() == [1, 5]
    assert den.candidates(5).tolist() == den.candidates().tolist()
    # ``origin`` does not rank, so it always gives every candidate.
    origin = _dream(6, 3, dllm_alg="origin")
    origin.step(_ranked_logits([1.0, 5.0, 3.0, 9.0, 2.0, 7.0]))
    assert origin.candidates(2).tolist() == origin.candidates().tolist()


def test_llada_candidates_limit_ranks_within_the_block_then_by_position():
    den = _llada(8, 8, 4)  # one token per step, blocks of 4
    den.step(_ranked_logits([2.0, 8.0, 4.0, 6.0, 99.0, 99.0, 99.0, 99.0]))
    assert den.canvas[1] == 5  # the later block never competes
    assert den.candidates(2).nonzero().squeeze(-1).tolist() == [2, 3]
    for _ in range(3):
        den.step(_ranked_logits([2.0, 8.0, 4.0, 6.0, 99.0, 99.0, 99.0, 99.0]))
    # First step of block 1: its positions were not ranked by the last step, so
    # the lowest positions come first.
    assert den.candidates(2).nonzero().squeeze(-1).tolist() == [4, 5]


def _varied_logits(gen, seed=0):
    """Random logits of varied sharpness per position (never the mask id), under
    which the confidence measures rank positions differently."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 4.0, gen)[torch.randperm(gen, generator=g)]
    logits = torch.randn(gen, VOCAB, generator=g) * scale[:, None]
    logits[:, MASK] = -1e4
    return logits


def _confidence(logits, alg):
    """Written out from the definitions: the chosen token's probability, top-1
    minus top-2 probability, or the negative entropy."""
    p = torch.softmax(logits.double(), dim=-1)
    top = p.sort(dim=-1, descending=True).values
    if alg in ("maskgit_plus", "low_confidence"):
        return top[:, 0]
    if alg == "topk_margin":
        return top[:, 0] - top[:, 1]
    return (p * torch.log(p + 1e-10)).sum(-1)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_unmasks_the_most_confident_positions_step_by_step(alg):
    gen, steps = 12, 5
    logits = _varied_logits(gen)
    conf = _confidence(logits, alg)
    den = _dream(gen, steps, dllm_alg=alg)
    timesteps = torch.linspace(1, 1e-3, steps + 1)
    order = []
    done, i = False, den.next_step
    while not done:
        masked = (den.canvas == MASK).nonzero().squeeze(-1)
        i = den.next_step
        n = (len(masked) if i == steps - 1
             else int(torch.tensor(float(len(masked))) * (1 - timesteps[i + 1] / timesteps[i])))
        want = masked[conf[masked].topk(n).indices].sort().values
        before = den.canvas.clone()
        done = den.step(logits)
        got = ((before == MASK) & (den.canvas != MASK)).nonzero().squeeze(-1)
        assert got.tolist() == want.tolist(), i
        order.append(got.tolist())
    assert torch.equal(den.canvas, logits.argmax(-1))
    # The three measures really rank differently here.
    first = {a: set(_confidence(logits, a).topk(3).indices.tolist())
             for a in ("maskgit_plus", "topk_margin", "entropy")}
    assert len({frozenset(v) for v in first.values()}) > 1


def test_llada_unmasks_the_most_confident_positions_of_the_block_step_by_step():
    gen, steps, block = 12, 6, 4  # 3 blocks, 2 steps each: 2 tokens per step
    logits = _varied_logits(gen, seed=1)
    conf = _confidence(logits, "low_confidence")
    den = _llada(gen, steps, block)
    for step in range(steps):
        b = step // 2
        in_block = torch.arange(b * block, (b + 1) * block)
        masked = in_block[den.canvas[in_block] == MASK]
        want = masked[conf[masked].topk(2).indices].sort().values
        before = den.canvas.clone()
        den.step(logits)
        got = ((before == MASK) & (den.canvas != MASK)).nonzero().squeeze(-1)
        assert got.tolist() == want.tolist(), step
    assert torch.equal(den.canvas, logits.argmax(-1))
