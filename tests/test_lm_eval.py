"""lm-eval's ``local-completions`` model on the shipped task configs against
``vllm-dare serve`` of the packaged default model: every response lm-eval scores
is the reference generation's answer to that question, and lm-eval's exact match
is the share of them that are right, close to the model card's figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_dare.default_model import default_model_path
from vllm_dare.tools.server_load import Server

LIMIT = 12
TASKS = {"dllm_add": "add", "dllm_sort": "sort", "dllm_words": "words"}


@pytest.fixture(scope="module")
def server(engines, tmp_path_factory):
    engines.close()  # one engine at a time on a 2-core machine
    log = tmp_path_factory.mktemp("lm-eval-server") / "server.log"
    srv = Server(default_model_path(), [
        "--served-model-name", "llada-tasks", "--dtype", "float32",
        "--max-model-len", "256", "--max-num-seqs", "4", "--gpu-memory-utilization", "0.4",
    ], log, env_updates={"VLLM_CPU_KVCACHE_SPACE": "1"})
    yield srv.base
    srv.stop()


def _reference_answers(task: str) -> list[str]:
    """The reference generation's answer text to the first LIMIT held-out questions,
    as lm-eval receives it (detokenized up to EOS, cut at the first newline)."""
    from transformers import PreTrainedTokenizerFast

    from vllm_dare.reference import llada_generate, load_reference_model
    from vllm_dare.training.tasks import TASKS as SPECS
    from vllm_dare.training.tasks import held_out
    from vllm_dare.training.train import prompt_ids

    path = default_model_path()
    ref = load_reference_model(path)
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    gen = SPECS[task].gen_length
    answers = []
    for ex in held_out(task)[:LIMIT]:
        # The server's defaults: steps = block length = max_tokens.
        canvas = llada_generate(ref.logits, prompt_ids(tok, ex.question),
                                ref.spec.mask_token_id, gen, gen, gen)
        if tok.eos_token_id in canvas:
            canvas = canvas[: canvas.index(tok.eos_token_id)]
        answers.append(tok.decode(canvas, skip_special_tokens=True).split("\n")[0].strip())
    return answers


def test_lm_eval_scores_the_reference_answers(server, tmp_path):
    from vllm_dare.lm_eval_tasks import TASKS_DIR
    from vllm_dare.training.tasks import held_out

    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "local-completions",
        "--model_args",
        f"model=llada-tasks,base_url={server}/v1/completions,tokenized_requests=False,"
        "tokenizer_backend=none,num_concurrent=2,max_retries=1",
        "--include_path", TASKS_DIR, "--tasks", "dllm_tasks", "--limit", str(LIMIT),
        "--log_samples", "--output_path", str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results_*.json")]
    assert results, proc.stdout[-2000:]
    card = json.loads((Path(default_model_path()) / "training.json").read_text())
    card = card["heldout_exact_accuracy_reference_fp32"]
    for lm_task, task in TASKS.items():
        assert results[0]["n-samples"][lm_task]["effective"] == LIMIT
        samples = [json.loads(line) for p in (tmp_path / "out").rglob(f"samples_{lm_task}_*.jsonl")
                   for line in p.read_text().splitlines()]
        samples.sort(key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(LIMIT))
        want = _reference_answers(task)
        assert [s["filtered_resps"][0].strip() for s in samples] == want, task
        right = sum(a == ex.answer for a, ex in zip(want, held_out(task)[:LIMIT]))
        assert results[0]["results"][lm_task]["exact_match,none"] == right / LIMIT
        # The card's figure: all 200 questions, blocks of 8 (the server's default
        # is one block); on 12 questions the model still answers about as well.
        assert right / LIMIT >= card[task] - 0.1, (task, right)
