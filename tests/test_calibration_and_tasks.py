"""The project's task set, the training objective, and the DARE calibration
command."""

from __future__ import annotations

import json
import random
from argparse import Namespace

import pytest
import torch

from vllm_dare.training.tasks import TASKS, held_out, is_correct, make_example, number_to_words


@pytest.mark.parametrize(
    "n,words",
    [(0, "zero"), (13, "thirteen"), (40, "forty"), (47, "forty seven"), (100, "one hundred"),
     (110, "one hundred ten"), (777, "seven hundred seventy seven")],
)
def test_number_to_words(n, words):
    assert number_to_words(n) == words


def test_examples_are_correct_and_heldout_is_disjoint():
    rng = random.Random(0)
    for _ in range(200):
        ex = make_example("add", rng)
        a, b = ex.question.rstrip("=").split("+")
        assert int(ex.answer) == int(a) + int(b) and len(a) == len(b) == 3
        ex = make_example("sort", rng)
        digits = ex.question.split()[1:]
        assert ex.answer.split() == sorted(digits)
    for task in TASKS:
        split = held_out(task)
        assert len({e.question for e in split}) == len(split) == 200
        assert held_out(task) == split  # reproducible
        assert is_correct(split[0], f" {split[0].answer}\n")


def test_diffusion_loss_trains_a_tiny_model(tmp_path):
    from vllm_dare.reference.modeling import ArchSpec, ReferenceDLLM
    from vllm_dare.tools.tiny_checkpoint import TinySize, build_config, random_weights
    from vllm_dare.training.train import chat_tokenizer, diffusion_loss, make_batch

    torch.manual_seed(0)
    tok = chat_tokenizer("llada", tmp_path)
    config = build_config("llada", TinySize())
    weights = {k: v.requires_grad_() for k, v in random_weights("llada", config, 0, torch.float32).items()}
    model = ReferenceDLLM(ArchSpec.from_config(config), weights)
    opt = torch.optim.AdamW(list(weights.values()), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    prompts, answers = make_batch(tok, "words", 16, rng, set())
    losses = []
    for _ in range(30):
        loss = diffusion_loss(model, prompts, answers, config["mask_token_id"], gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_calibration_sweeps_and_writes_engine_config(engines, tiny_llada, tmp_path):
    from vllm_dare.tools.calibrate_dare import calibrate, write_config

    llm = engines.get(tiny_llada, attention_backend="dare",
                      additional_config={"dare": {"mode": "kv+o", "tau_kv": 0.0, "tau_o": 0.0}})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n12+34=\nSort: 9 3 7 1\n")
    # K/V reuse only: a token's keys/values depend on its own input alone, so a
    # negligible threshold reuses exactly-unchanged rows and changes no output.
    args = Namespace(model=str(tiny_llada), prompts=str(prompts), per_task=0, max_tokens=16,
                     steps_per_token=True, mode="kv", taus=[1e-6, 0.05, 1.0],
                     min_agreement=0.99, max_accuracy_drop=0.01)
    report = calibrate(args, llm=llm)
    rows = {r["tau"]: r for r in report["rows"]}
    assert rows[1e-6]["kv_reuse"] <= rows[0.05]["kv_reuse"] <= rows[1.0]["kv_reuse"]
    assert rows[1e-6]["kv_reuse"] > 0  # layer-0 rows of unchanged tokens
    assert rows[1.0]["kv_reuse"] > 0.5
    assert all(r["o_reuse"] == 0 for r in rows.values())
    assert rows[1e-6]["token_agreement"] == 1.0
    assert report["chosen_tau"] is not None
    assert rows[report["chosen_tau"]]["token_agreement"] >= 0.99
    out = tmp_path / "dare.json"
    config = write_config(report, str(out))
    assert json.loads(out.read_text()) == config
    assert config["dare"]["tau_kv"] == report["chosen_tau"]
