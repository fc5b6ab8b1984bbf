"""The project's task set, the training objective, and the DARE calibration
command."""

from __future__ import annotations

import json
import random
import shlex
from argparse import Namespace
from pathlib import Path

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


def test_training_cli_with_bf16_autocast_and_compile_writes_a_loadable_model(tmp_path,
                                                                           monkeypatch):
    """The training speed-ups (compiled forward, bf16 matmuls) run end to end and
    write a checkpoint the reference loads, with its training card. The suite turns
    TorchDynamo off (``conftest.py``); this test turns it back on, so the forward
    really is compiled (graphs counted)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from vllm_dare.reference import load_reference_model
    from vllm_dare.training.train import main

    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)  # read when compiling
    torch._dynamo.reset()
    graphs_before = counters["stats"]["unique_graphs"]

    out = tmp_path / "model"
    argv = ["llada", str(out), "--hidden-size", "32", "--layers", "1", "--heads", "2",
            "--intermediate-size", "64", "--batch", "8", "--steps", "4", "--eval-every", "4",
            "--eval-n", "2", "--final-eval-n", "3", "--threads", "1", "--bf16-autocast",
            "--compile", "--task-weights", '{"add": 2, "sort": 1.5}']
    main(argv)
    assert counters["stats"]["unique_graphs"] > graphs_before
    torch._dynamo.reset()
    card = json.loads((out / "training.json").read_text())
    assert card["steps"] == 4
    # The recorded command is the one a shell reruns: the module call, then the
    # arguments with the JSON one quoted.
    assert shlex.split(card["command"]) == ["python", "-m", "vllm_dare.training.train", *argv]
    assert card["accuracy_on"] == "the first 3 held-out examples per task"
    assert card["deterministic_algorithms"] is True
    assert set(card["heldout_exact_accuracy_reference_fp32"]) == set(TASKS)
    model = load_reference_model(out)
    assert model.logits(torch.tensor([1, 2, 3])).shape[0] == 3


def test_training_is_bitwise_reproducible_from_a_seed_with_two_threads(tmp_path):
    """Two runs of one command write byte-identical weights, with 2 threads (the
    default): the CPU embedding backward adds with atomics unless PyTorch's
    deterministic algorithms are on. The run leaves the caller's torch settings alone."""
    from vllm_dare.training.train import main

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    written = []
    for run in ("a", "b"):
        out = tmp_path / run
        main(["llada", str(out), "--hidden-size", "64", "--layers", "2", "--heads", "2",
              "--intermediate-size", "128", "--batch", "64", "--steps", "60", "--lr", "1e-2",
              "--eval-every", "60", "--eval-n", "1", "--final-eval-n", "2", "--threads", "2",
              "--seed", "3"])
        written.append((out / "model.safetensors").read_bytes())
        assert torch.get_num_threads() == threads
        assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert written[0] == written[1]


@pytest.mark.parametrize("flag", ["--steps", "--batch", "--eval-every", "--eval-n",
                                  "--final-eval-n", "--threads", "--hidden-size"])
def test_training_cli_rejects_a_count_below_one(flag, capsys, tmp_path):
    from vllm_dare.training.train import main

    with pytest.raises(SystemExit):
        main(["llada", str(tmp_path / "out"), flag, "0"])
    assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weights,message", [
    ('{"ad": 2}', "unknown task(s) ad; tasks are add, sort, words"),
    ('{"add": 0}', "the weight of add must be a positive number, got 0"),
    ('{"add": "2"}', "the weight of add must be a positive number, got '2'"),
    ("[2, 1]", "must be a JSON object"),
    ("{add: 2}", "not JSON"),
])
def test_training_cli_rejects_bad_task_weights(weights, message, capsys, tmp_path):
    from vllm_dare.training.train import main

    with pytest.raises(SystemExit):
        main(["llada", str(tmp_path / "out"), "--task-weights", weights])
    err = capsys.readouterr().err
    assert "argument --task-weights:" in err and message in err
    assert not (tmp_path / "out").exists()


def test_trained_dream_checkpoint_serves_with_its_evaluation_algorithm(tmp_path):
    """A Dream run writes the generation_config the packaged dream-tasks ships:
    maskgit_plus (what the card's accuracy is measured with), no fixed step count."""
    from vllm_dare.default_model import packaged_model_path
    from vllm_dare.training.train import main

    out = tmp_path / "dream"
    # 20 steps: a warm-up of exactly one scheduler step used to divide by zero
    main(["dream", str(out), "--hidden-size", "32", "--layers", "1", "--heads", "2",
          "--kv-heads", "1", "--intermediate-size", "64", "--batch", "4", "--steps", "20",
          "--eval-every", "20", "--eval-n", "1", "--final-eval-n", "3", "--threads", "1"])
    assert json.loads((out / "training.json").read_text())["steps"] == 20
    written = json.loads((out / "generation_config.json").read_text())
    assert written["alg"] == "maskgit_plus" and "steps" not in written
    shipped = Path(packaged_model_path("dream-tasks")) / "generation_config.json"
    assert written == json.loads(shipped.read_text())


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
                     min_agreement=0.99, max_accuracy_drop=0.01,
                     dare_engine_config={"refresh_at_block_start": True})
    report = calibrate(args, llm=llm)
    rows = {r["tau"]: r for r in report["rows"]}
    assert rows[1e-6]["kv_reuse"] <= rows[0.05]["kv_reuse"] <= rows[1.0]["kv_reuse"]
    assert rows[1e-6]["kv_reuse"] > 0  # layer-0 rows of unchanged tokens
    assert rows[1.0]["kv_reuse"] > 0.5
    assert all(r["o_reuse"] == 0 for r in rows.values())
    # What decided the rows: the same forced share at every tau; the predictor
    # refuses the rest that is not reused, fewer as tau grows.
    for r in rows.values():
        assert r["forced"] == rows[1.0]["forced"] > 0
        assert r["forced"] + r["kv_reuse"] + r["kv_refused"] == pytest.approx(1.0)
        assert r["o_refused"] == 0
    assert rows[1e-6]["kv_refused"] > rows[0.05]["kv_refused"] >= rows[1.0]["kv_refused"]
    assert rows[1e-6]["token_agreement"] == 1.0
    assert report["chosen_tau"] is not None
    assert rows[report["chosen_tau"]]["token_agreement"] >= 0.99
    out = tmp_path / "dare.json"
    config = write_config(report, str(out))
    assert json.loads(out.read_text()) == config
    assert config["dare"]["tau_kv"] == report["chosen_tau"]
    # The engine settings it ran under are part of the config it writes.
    assert config["dare"]["refresh_at_block_start"] is True


def _load_harness():
    import importlib.util
    import sys
    from pathlib import Path

    if "quality_speed" in sys.modules:
        return sys.modules["quality_speed"]
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_speed.py"
    spec = importlib.util.spec_from_file_location("quality_speed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality_speed"] = module  # dataclasses resolve their module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text", ["fast", "dare-kv", "dare-qkv:0.1", "dare-o:-1", "exact:steps/0",
                                  "dare-kv:0.1,often", "dare-kv:0.1,candidates=0",
                                  "dare-kv:0.1,candidates=two", "exact@lru", "exact@none",
                                  "dare-kv:0.1@", "exact~fast:1", "exact~threshold",
                                  "exact~threshold:x"])
def test_harness_rejects_unknown_modes(text):
    with pytest.raises(ValueError):
        _load_harness().parse_mode(text)


def test_harness_mode_options_become_request_knobs():
    parse = _load_harness().parse_mode
    assert parse("dare-kv+o:0.05").extra_args["dare_recompute_candidates"] is False
    limited = parse("dare-kv+o:0.05,candidates=3").extra_args
    assert limited["dare_recompute_candidates"] is True
    assert limited["dare_candidate_limit"] == 3
    assert "dare_candidate_limit" not in parse("dare-o:0.1,candidates").extra_args
    cached = parse("dare-kv+o:0.05,candidates=3@dual")
    assert cached.engine == "dare" and cached.extra_args["dllm_cache"] == "dual"
    assert cached.extra_args["dare_candidate_limit"] == 3
    assert parse("exact:steps/2@prefix").steps_divisor == 2
    parallel = parse("exact@dual~threshold:0.8")
    assert parallel.engine == "exact" and parallel.extra_args == {
        "dllm_cache": "dual", "dllm_parallel": "threshold", "dllm_threshold": 0.8}
    assert parse("dare-kv:0.05~factor:2").extra_args["dllm_factor"] == 2.0
    assert parse("exact:random@dkv_greedy").extra_args == {
        "dllm_remasking": "random", "dllm_seed": 0, "dllm_cache": "dkv_greedy"}
    assert parse("exact:blocks@dual").extra_args == {"blocks": True, "dllm_cache": "dual"}


def test_max_mode_must_serve_the_modes_measured(capsys):
    """A ``max_mode`` in ``--dare-engine-config`` that cannot serve a mode the harness
    sweeps or the calibration tool calibrates is an error before any engine starts."""
    from vllm_dare.tools import calibrate_dare

    with pytest.raises(SystemExit, match="mode 'dare-o:0.05' with --dare-engine-config: "
                       "dare mode 'o' needs a DARE cache this engine does not keep"):
        _load_harness().main(["--dare-engine-config", '{"max_mode": "kv"}',
                              "--modes", "exact", "dare-kv:0.05", "dare-o:0.05"])
    with pytest.raises(SystemExit):
        calibrate_dare.main(["--model", "m", "--mode", "kv+o",
                             "--dare-engine-config", '{"max_mode": "kv"}'])
    assert "--mode kv+o with --dare-engine-config: dare mode 'kv+o' needs a DARE cache" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("config,message", [
    ('{"mode": "kv"}', "must not set mode"),
    ('[1]', "must be a JSON object"),
    ('{"tau_o": 0.1}', "must not set tau_o"),
    ('{"refresh_at_block_start": 1}', "refresh_at_block_start must be true or false"),
    ('{"refresh_every": 2}', "unknown DARE setting"),
    ('{refresh', "not JSON"),
])
def test_dare_engine_config_option_rejects_bad_settings(config, message, capsys):
    """``--dare-engine-config`` of the harness and of the calibration tool."""
    from vllm_dare.tools import calibrate_dare

    with pytest.raises(SystemExit):
        _load_harness().main(["--dare-engine-config", config, "--modes", "exact"])
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        calibrate_dare.main(["--model", "m", "--dare-engine-config", config])
    assert message in capsys.readouterr().err


def test_quality_speed_harness_reports_every_mode(engines, tiny_llada, tmp_path):
    harness = _load_harness()
    report = harness.main(
        ["--model", str(tiny_llada), "--tasks", "add", "sort", "--per-task", "3",
         "--modes", "exact", "exact:steps/2", "exact@dual", "dare-kv:1e-6", "dare-kv+o:0.5",
         "exact~factor:4", "--out", str(tmp_path / "qs")],
        engine_for=lambda kind, **kw: engines.get(tiny_llada, **kw),
    )
    rows = {r["mode"]: r for r in report["rows"]}
    assert list(rows) == ["exact", "exact:steps/2", "exact@dual", "dare-kv:1e-6",
                          "dare-kv+o:0.5", "exact~factor:4"]
    # factor 4 accepts the 2nd and 3rd most confident positions whatever their
    # confidence (1 - 4/3 < 0, 1 - 4/4 = 0): at least 3 tokens per step, so a
    # block of 8 takes at most 3 steps (+ the prompt pass: add 9 -> at most 4).
    assert rows["exact~factor:4"]["tasks"]["add"]["nfe_per_request"] <= 4
    # add: prompt P tokens, gen 8 in one block of 8 steps. Exact computes the prompt
    # pass and 8 forwards of P + 8 rows; dual the prompt pass, one forward of P + 8
    # and 7 of the 8-token block (per layer).
    from vllm_dare.training.tasks import held_out
    from vllm_dare.training.train import prompt_ids

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llada))
    lengths = [len(prompt_ids(tok, ex.question)) for ex in held_out("add")[:3]]
    assert rows["exact@dual"]["tasks"]["add"]["rows_vs_exact"] == pytest.approx(
        sum(P + (P + 8) + 7 * 8 for P in lengths) / sum(P + 8 * (P + 8) for P in lengths))
    assert rows["exact"]["rows_vs_exact"] == 1.0 and rows["dare-kv:1e-6"]["rows_vs_exact"] == 1.0
    assert rows["exact@dual"]["nfe_per_request"] == rows["exact"]["nfe_per_request"]
    exact, half = rows["exact"], rows["exact:steps/2"]
    assert exact["token_agreement"] == 1.0 and exact["speedup_vs_exact"] == 1.0
    # add: 8 steps, sort: 16 steps, + the prompt-only forward; half the steps each
    assert exact["tasks"]["add"]["nfe_per_request"] == 9
    assert exact["tasks"]["sort"]["nfe_per_request"] == 17
    assert half["tasks"]["add"]["nfe_per_request"] == 5
    assert half["tokens_per_forward"] > 1.5 * exact["tokens_per_forward"]
    assert exact["kv_reuse"] is None
    # K/V reuse at a negligible threshold (unchanged layer-0 rows) changes nothing
    assert rows["dare-kv:1e-6"]["token_agreement"] == 1.0
    assert rows["dare-kv:1e-6"]["o_reuse"] == 0
    big = rows["dare-kv+o:0.5"]
    assert 0.5 < big["kv_reuse"] <= 1 and 0.5 < big["o_reuse"] <= 1
    # With O reuse, a row that is not forced is reused: the predictor refuses none.
    assert big["kv_refused_share"] == big["o_refused_share"] == 0
    assert big["forced_share"] + big["kv_reuse"] == pytest.approx(1.0)
    tiny = rows["dare-kv:1e-6"]
    assert tiny["kv_refused_share"] > 0 and tiny["o_refused_share"] == 0
    assert tiny["forced_share"] + tiny["kv_reuse"] + tiny["kv_refused_share"] == (
        pytest.approx(1.0))
    assert exact["forced_share"] is None
    table = (tmp_path / "qs.md").read_text()
    assert "| forced | K/V refused | O refused |" in table
    for row in rows.values():
        assert set(row["tasks"]) == {"add", "sort"}
        assert row["seconds"] > 0
    heat = report["heat_maps"]
    assert heat["mode"] == "dare-kv+o:0.5"
    kv = heat["tasks"]["add"]["kv_reuse"]
    assert len(kv) == 2 and len(kv[0]) == 9  # layers x forwards
    assert all(v == 0 for v in kv[0][:1])  # first forward: nothing cached yet
    saved = json.loads((tmp_path / "qs.json").read_text())
    assert saved["settings"]["tasks"]["add"]["requests"] == 3
    assert (tmp_path / "qs_accuracy_vs_speedup.png").stat().st_size > 0
    assert (tmp_path / "qs_reuse_heatmap.png").stat().st_size > 0


def test_calibration_cli_defaults_and_errors(tmp_path, capsys):
    """The calibration tool defaults to the packaged model, shows its defaults,
    can turn one step per token off, names the flag of a bad argument and keeps an
    existing config unless told to replace it."""
    from vllm_dare.default_model import default_model_path
    from vllm_dare.tools import calibrate_dare

    with pytest.raises(SystemExit) as e:
        calibrate_dare.main(["--help"])
    assert e.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert f"(default: {default_model_path()})" in help_text
    assert "--no-steps-per-token" in help_text and "(default: 30)" in help_text
    for argv, message in [
        (["--taus", "0.1", "-1"], "argument --taus: must be a number >= 0.0, got '-1'"),
        (["--per-task", "0"], "argument --per-task: must be an integer >= 1"),
        (["--min-agreement", "2"], "argument --min-agreement: must be a number in [0.0, 1.0]"),
        (["--mode", "kvo"], "argument --mode: invalid choice: 'kvo'"),
    ]:
        with pytest.raises(SystemExit):
            calibrate_dare.main(argv)
        assert message in capsys.readouterr().err
    existing = tmp_path / "dare.json"
    existing.write_text("{}")
    with pytest.raises(SystemExit):
        calibrate_dare.main(["--out", str(existing)])
    assert f"--out {existing} exists; pass --overwrite" in capsys.readouterr().err
    assert existing.read_text() == "{}"


def test_calibration_cli_runs_with_defaults(monkeypatch, tmp_path):
    """Without --model it calibrates the packaged model; --no-steps-per-token
    reaches the sweep."""
    from vllm_dare.default_model import default_model_path
    from vllm_dare.tools import calibrate_dare

    seen = {}

    def fake_calibrate(args):
        seen.update(vars(args))
        return {"model": "m", "mode": args.mode, "prompts": 0, "device": "cpu", "rows": [],
                "chosen_tau": None}

    monkeypatch.setattr(calibrate_dare, "calibrate", fake_calibrate)
    calibrate_dare.main(["--no-steps-per-token", "--out", str(tmp_path / "c.json")])
    assert seen["model"] == default_model_path()
    assert seen["steps_per_token"] is False
    assert seen["taus"][0] <= 0.001 and seen["taus"][-1] >= 0.5


def test_harness_cli_errors(tmp_path, capsys):
    """The harness names the flag of a bad argument, lists the modes in its help and
    keeps existing results unless told to replace them (before any engine starts)."""
    harness = _load_harness()
    with pytest.raises(SystemExit):
        harness.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "dare-kv:TAU" in help_text and "(default: 200)" in help_text
    for argv, message in [
        (["--modes", "exact", "dare-x:1"], "argument --modes: unknown DARE mode 'x'"),
        (["--tasks", "poems"], "argument --tasks: invalid choice: 'poems'"),
        (["--per-task", "-3"], "argument --per-task: must be an integer >= 1"),
    ]:
        with pytest.raises(SystemExit):
            harness.main(argv)
        assert message in capsys.readouterr().err
    (tmp_path / "qs.json").write_text("{}")
    with pytest.raises(SystemExit):
        harness.main(["--modes", "exact", "--out", str(tmp_path / "qs")])
    assert "exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert (tmp_path / "qs.json").read_text() == "{}"
