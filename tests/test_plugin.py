"""Plugin discovery, config classes, checkpoint loading without remote code, and
the CPU mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "configs"


def test_entry_points_are_installed():
    general = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert general.get("dare") == "vllm_dare:register"
    platform = {e.name: e.value for e in entry_points(group="vllm.platform_plugins")}
    assert platform.get("dare_cpu_triton") == "vllm_dare.cpu_triton:enable_if_cpu_build"
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("vllm-dare") == "vllm_dare.entrypoints.cli:main"


def test_register_is_idempotent_and_registers_everything():
    import vllm_dare
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    vllm_dare.register()
    vllm_dare.register()
    archs = ModelRegistry.get_supported_archs()
    assert "LLaDAModelLM" in archs and "DreamModel" in archs
    assert MODELS_CONFIG_MAP["LLaDAModelLM"].family == "llada"
    assert MODELS_CONFIG_MAP["DreamModel"].family == "dream"


@pytest.mark.parametrize(
    "name,fields",
    [
        ("llada-8b-instruct", dict(hidden_size=4096, num_key_value_heads=32,
                                   intermediate_size=12288, max_position_embeddings=4096,
                                   head_dim=128, mask_token_id=126336)),
        ("dream-v0-instruct-7b", dict(hidden_size=3584, num_key_value_heads=4,
                                      intermediate_size=18944, head_dim=128,
                                      mask_token_id=151666)),
    ],
)
def test_official_configs_parse_with_vllm_names(name, fields):
    from vllm_dare.configs import DreamConfig, LLaDAConfig

    path = SHARED / f"{name}.config.json"
    if not path.exists():
        pytest.fail(f"shared config missing: {path}")
    raw = json.loads(path.read_text())
    cls = LLaDAConfig if raw["model_type"] == "llada" else DreamConfig
    cfg = cls(**raw)
    for key, value in fields.items():
        assert getattr(cfg, key) == value, key
    assert cfg.tie_word_embeddings is False
    assert cfg.rope_parameters["rope_theta"] == raw["rope_theta"]


def test_llada_config_rejects_olmo_options():
    from vllm_dare.configs import LLaDAConfig

    with pytest.raises(ValueError, match="weight_tying"):
        LLaDAConfig(weight_tying=True).validate_architecture()


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_checkpoint_loads_without_trust_remote_code(family, tiny_llada, tiny_dream):
    import vllm_dare
    from transformers import AutoConfig, AutoTokenizer

    vllm_dare.register()
    path = tiny_llada if family == "llada" else tiny_dream
    cfg_json = json.loads((path / "config.json").read_text())
    assert "auto_map" in cfg_json  # the official remote-code pointer is kept...
    assert not list(path.glob("*.py"))  # ...but no remote code is shipped
    cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    assert type(cfg).__module__.startswith("vllm_dare.configs")
    assert cfg.mask_token_id == cfg_json["mask_token_id"]
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    assert tok.convert_ids_to_tokens(cfg.mask_token_id) in ("<|mdm_mask|>", "<|mask|>")
    text = "12+34=\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tiny_checkpoint_has_official_names_and_every_official_field(tiny_llada):
    from vllm_dare.tools.tiny_checkpoint import weight_shapes

    official = json.loads((SHARED / "llada-8b-instruct.config.json").read_text())
    written = json.loads((tiny_llada / "config.json").read_text())
    assert set(official) <= set(written)
    tensors = load_file(str(tiny_llada / "model.safetensors"))
    assert set(tensors) == set(weight_shapes("llada", written))
    assert "model.transformer.ff_out.weight" in tensors  # LM head
    assert "model.transformer.blocks.0.ff_out.weight" in tensors  # MLP down
    assert tensors["model.transformer.wte.weight"].dtype == torch.bfloat16


def test_cpu_mode_follows_the_installed_build():
    from vllm_dare import cpu_triton

    cpu_build = cpu_triton.is_cpu_build()
    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None);"
        "os.environ.pop('VLLM_USE_V2_MODEL_RUNNER', None);"
        "from vllm_dare import cpu_triton; cpu_triton.enable_if_cpu_build();"
        "from triton.backends import backends;"
        "print(os.environ.get('TRITON_INTERPRET'), os.environ.get('VLLM_USE_V2_MODEL_RUNNER'),"
        " 'cpu' in backends, backends['cpu'].driver.is_active() if 'cpu' in backends else None)"
    )
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**os.environ, "VLLM_DARE_CPU_TRITON": "1"})
    if cpu_build:
        assert on.stdout.split() == ["1", "1", "True", "False"], on.stderr
    else:  # CUDA build: nothing changes
        assert on.stdout.split() == ["None", "None", "False", "None"], on.stderr
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "VLLM_DARE_CPU_TRITON": "0"})
    assert off.stdout.split() == ["None", "None", "False", "None"], off.stderr


def test_cpu_mode_does_nothing_on_a_cuda_build(monkeypatch):
    from vllm_dare import cpu_triton

    def fake_version(name):
        if name == "vllm":
            return "0.33.0"
        raise AssertionError(name)

    monkeypatch.setattr(cpu_triton, "version", fake_version)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not cpu_triton.is_cpu_build()
    assert cpu_triton.enable_if_cpu_build() is None
    assert "TRITON_INTERPRET" not in os.environ


def test_dare_backend_refuses_models_it_cannot_serve(engines, tmp_path):
    """A non-dLLM model with --attention-backend dare is an error, not a silent
    fallback (vLLM's CPU platform would otherwise ignore the selection)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from vllm import LLM

    engines.close()
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(Exception) as info:
        LLM(model=str(tmp_path / "llama"), skip_tokenizer_init=True, enforce_eager=True,
            dtype="float32", max_model_len=64, attention_backend="dare")
    chain, err = [], info.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any("serves LLaDA and Dream" in text for text in chain), chain


def test_request_figures_cross_processes_through_the_channel(tmp_path, monkeypatch):
    """The multiprocess-executor path of ``vllm_compat``'s worker-to-scheduler
    channel: what a worker puts under a request id (free text) the scheduler takes once, by section; nothing
    is left behind, and another engine's figures are not touched."""
    import tempfile

    from vllm_dare import vllm_compat

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine, other = vllm_compat.stats_channel(1234), vllm_compat.stats_channel(12345)
    (tmp_path / "vllm-dare-request-stats-1234-stale.dllm.json").write_text("{}")
    vllm_compat.clear_stats_channel(mine)
    assert list(tmp_path.iterdir()) == []
    req_id = "cmpl/../weird id \u00fc-0"
    vllm_compat.put_request_figures(req_id, "dllm", {"forwards": 9}, mine)
    vllm_compat.put_request_figures(req_id, "dare", {"kv_reused": 3}, mine)
    vllm_compat.put_request_figures(req_id, "dllm", {"forwards": 2}, other)
    assert vllm_compat.take_request_figures(req_id) is None  # not in this process's store
    assert vllm_compat.take_request_figures(req_id, mine) == {"dllm": {"forwards": 9},
                                                "dare": {"kv_reused": 3}}
    assert vllm_compat.take_request_figures(req_id, mine) is None
    assert [p.name.startswith("vllm-dare-request-stats-12345-") for p in tmp_path.iterdir()] == [True]
    vllm_compat.clear_stats_channel(mine)
    assert vllm_compat.take_request_figures(req_id, other) == {"dllm": {"forwards": 2}}
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("in_process", [True, False])
def test_failed_requests_reach_the_scheduler_once(tmp_path, monkeypatch, in_process):
    """What the worker fails in a step, the scheduler takes after it, once, with
    the reason: through this process's store or the engine's channel; the
    latest report per request of another kind likewise, kept apart."""
    import tempfile

    from vllm_dare import vllm_compat

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    prefix = None if in_process else vllm_compat.stats_channel(4321)
    assert vllm_compat.take_step_reports("failures", prefix) == {}
    vllm_compat.report_step("failures", {"a": "DenoisingStateError: got 3, expected 4"}, prefix)
    vllm_compat.report_step("failures", {"b::dllm-cfg-uncond": "ValueError: x"}, prefix)
    assert vllm_compat.take_step_reports("failures", prefix) == {
        "a": "DenoisingStateError: got 3, expected 4", "b::dllm-cfg-uncond": "ValueError: x"}
    assert vllm_compat.take_step_reports("failures", prefix) == {}
    # Another kind of report (streaming's committed prefixes) is kept apart.
    vllm_compat.report_step("committed", {"a": [5, 6]}, prefix)
    vllm_compat.report_step("committed", {"a": [5, 6, 7]}, prefix)
    assert vllm_compat.take_step_reports("failures", prefix) == {}
    assert vllm_compat.take_step_reports("committed", prefix) == {"a": [5, 6, 7]}
    assert list(tmp_path.iterdir()) == []


def test_vllm_dare_serve_adds_what_diffusion_serving_needs():
    from vllm_dare.entrypoints.cli import (
        MIDDLEWARE,
        with_middleware,
        with_shutdown_timeout,
    )

    args = ["--port", "1"]
    assert with_middleware(args) == [*args, "--middleware", MIDDLEWARE]
    assert with_middleware(["--middleware", MIDDLEWARE]) == ["--middleware", MIDDLEWARE]
    assert with_middleware([f"--middleware={MIDDLEWARE}"]) == [f"--middleware={MIDDLEWARE}"]
    other = ["--middleware", "my.Middleware"]
    assert with_middleware(other) == [*other, "--middleware", MIDDLEWARE]
    assert with_shutdown_timeout(args) == [*args, "--shutdown-timeout", "15"]
    assert with_shutdown_timeout(["--shutdown-timeout", "0"]) == ["--shutdown-timeout", "0"]
    assert with_shutdown_timeout(["--shutdown-timeout=9"]) == ["--shutdown-timeout=9"]


def test_vllm_dare_command_names_its_one_subcommand():
    import subprocess
    import sys

    script = Path(sys.executable).parent / "vllm-dare"
    help_run = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "vllm-dare serve MODEL" in help_run.stdout
    bad = subprocess.run([str(script), "bench"], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "unknown command 'bench'" in bad.stderr


def test_completions_without_max_tokens_get_the_served_canvas():
    from types import SimpleNamespace

    from vllm_dare.entrypoints.sampling_middleware import (
        default_max_tokens,
        fill_default_max_tokens,
    )

    def app(canvas, max_model_len):
        config = SimpleNamespace(diffusion_config=SimpleNamespace(canvas_length=canvas),
                                 model_config=SimpleNamespace(max_model_len=max_model_len))
        return SimpleNamespace(state=SimpleNamespace(vllm_config=config))

    assert default_max_tokens(app(256, 4096)) == 256
    assert default_max_tokens(app(256, 128)) == 128  # vLLM refuses more than max_model_len
    assert default_max_tokens(SimpleNamespace(state=SimpleNamespace())) is None
    body = {"prompt": "x"}
    assert fill_default_max_tokens("/v1/completions", body, 64) and body["max_tokens"] == 64
    body = {"prompt": "x", "max_tokens": None}
    assert fill_default_max_tokens("/v1/completions", body, 64) and body["max_tokens"] == 64
    body = {"prompt": "x", "max_tokens": 8}
    assert not fill_default_max_tokens("/v1/completions", body, 64) and body["max_tokens"] == 8
    # chat gets the canvas from the engine's served default (max_new_tokens)
    assert not fill_default_max_tokens("/v1/chat/completions", {"messages": []}, 64)
    assert not fill_default_max_tokens("/v1/completions", {"prompt": "x"}, None)


@pytest.mark.parametrize("max_mode", ["kv+o", "kv", "off"])
@pytest.mark.parametrize("queries_per_kv", [1, 7])
def test_dare_backend_classes_pickle_to_themselves(max_mode, queries_per_kv):
    """vLLM may pickle a layer's backend class (and its impl class) into another
    process; the name must resolve there to the same class, whose cache spec asks for
    exactly the rows of its layout."""
    import pickle

    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_dare.attention_backends.dare_backend import dare_backend_for
    from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout

    layout = DareCacheLayout.for_max_mode(4 * queries_per_kv, 4, 64, max_mode)
    backend = dare_backend_for(queries_per_kv, layout.has_o, layout.has_qref)
    assert pickle.loads(pickle.dumps(backend)) is backend
    assert pickle.loads(pickle.dumps(backend.get_impl_cls())) is backend.get_impl_cls()
    assert dare_backend_for(queries_per_kv, layout.has_o, layout.has_qref) is backend
    if max_mode == "kv+o":  # the defaults name the same class
        assert dare_backend_for(queries_per_kv) is backend
        assert pickle.loads(pickle.dumps(dare_backend_for(queries_per_kv))) is backend
    spec = FullAttentionSpec(block_size=16, num_kv_heads=4, head_size=64,
                             dtype=torch.bfloat16)
    per_slot = backend.customize_spec(spec).state_content_bytes * spec.num_kv_heads
    assert per_slot == layout.width * 2  # bf16


_LAYER_REFUSALS = """
import socket, torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm_dare.attention_backends.dare_layer_step import DareRuntime
from vllm_dare.model_executor.models.diffusion_attention import DiffusionSelfAttention

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
with set_current_vllm_config(VllmConfig()):
    init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, "gloo")
    initialize_model_parallel(1, 1)
    kw = dict(hidden_size=256, num_heads=4, num_kv_heads=2, max_position=128, qkv_bias=True,
              rope_full_precision=False, layer_index=0,
              dare_runtime=DareRuntime(1, False, torch.device("cpu")))
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    DiffusionSelfAttention(rope_parameters=rope, prefix="ok", **kw)
    print("SERVED")
    for name, extra in [("partial-rope", dict(rope_parameters={**rope, "partial_rotary_factor": 0.5})),
                        ("quantized", dict(rope_parameters=rope, quant_config=object()))]:
        try:
            DiffusionSelfAttention(prefix=name, **kw, **extra)
            print(name, "ACCEPTED")
        except ValueError as e:
            print(name, "REFUSED:", e)
"""


def test_dare_layer_refuses_weights_and_rope_its_kernels_cannot_read():
    """The recomputed-rows projection reads the K/V and output weights and the RoPE
    table as they are: a DARE attention layer with quantized weights, or with RoPE
    over part of the head, is refused at model construction with the reason (in a
    subprocess: it sets up vLLM's distributed state)."""
    result = subprocess.run([sys.executable, "-c", _LAYER_REFUSALS], capture_output=True,
                            text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 0 and "SERVED" in out, out + result.stderr[-3000:]
    assert ("partial-rope REFUSED: the DARE backend supports full-head rotate-half RoPE "
            "only, got RotaryEmbedding over 32 of 64 dimensions") in out, out
    assert "quantized REFUSED: the DARE backend needs unquantized attention weights" in out, out


def test_only_a_requested_shutdown_hides_vllms_engine_dead_report():
    import logging

    from vllm.v1.engine.exceptions import EngineDeadError

    from vllm_dare.vllm_compat import ShutdownEngineDeadFilter

    def record(message, exc=None):
        exc_info = (type(exc), exc, None) if exc else None
        return logging.LogRecord("vllm", logging.ERROR, __file__, 1, message, None, exc_info)

    dead = EngineDeadError()
    f = ShutdownEngineDeadFilter()
    assert f.filter(record("AsyncLLM output_handler failed.", dead))  # while serving: kept
    assert f.filter(record("[shutdown] API server: shutdown triggered"))
    assert not f.filter(record("AsyncLLM output_handler failed.", dead))
    assert f.filter(record("AsyncLLM output_handler failed.", ValueError("real")))
    assert f.filter(record("anything else"))
