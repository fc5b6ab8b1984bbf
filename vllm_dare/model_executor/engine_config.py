"""Per-architecture engine set-up for LLaDA and Dream (vLLM's ``MODELS_CONFIG_MAP``).

vLLM runs ``verify_and_update_config`` of an architecture's entry while it builds
the engine config, in the process that builds it. For our two architectures it:

* turns on vLLM's diffusion path (``DiffusionConfig``, canvas = longest
  ``max_tokens`` served) with the whole-sequence scheduler;
* forces synchronous scheduling and turns prefix caching off: a bidirectional
  prompt's keys/values depend on the canvas, so they cannot be shared or kept;
* makes sure one step can hold a whole sequence (``max_num_batched_tokens >=
  max_model_len``);
* resolves the denoising defaults (generation_config.json +
  ``--override-generation-config``), hands them to the workers and installs the
  admission-time request validator;
* keeps vLLM's own sampling defaults out of the way: diffusion requests must keep
  ``temperature=1.0`` in vLLM (the denoising temperature is ``dllm_temperature``);
  a request without ``max_tokens`` gets the served canvas;
* on vLLM's CPU build, runs the model eagerly (no torch.compile warm-up).
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from vllm_dare import vllm_compat

logger = init_logger(__name__)

SCHEDULER_CLS = (
    "vllm_dare.core.whole_sequence_scheduler.WholeSequenceDiffusionScheduler"
)

# vLLM sampling defaults a generation_config.json may carry; for diffusion models
# vLLM rejects any temperature other than 1.0, so they are not forwarded to it.
_VLLM_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p")


class DenoisingEngineConfig(VerifyAndUpdateConfig):
    family: str = ""

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        from vllm.config.diffusion import DiffusionConfig

        from vllm_dare.model_executor.denoising.params import DenoisingDefaults
        from vllm_dare.model_executor.denoising.request_validation import (
            validator_name,
        )

        model_config = vllm_config.model_config
        hf_config = model_config.hf_config
        scheduler_config = vllm_config.scheduler_config
        cache_config = vllm_config.cache_config

        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError("vllm-dare does not support pipeline parallelism")

        if vllm_config.diffusion_config is None:
            vllm_config.diffusion_config = DiffusionConfig(
                canvas_length=hf_config.canvas_length
            )
        canvas_length = vllm_config.diffusion_config.canvas_length

        if scheduler_config.async_scheduling:
            raise ValueError(
                "vllm-dare recomputes each request's whole sequence every denoising "
                "step and needs synchronous scheduling; remove --async-scheduling"
            )
        scheduler_config.async_scheduling = False
        if scheduler_config.scheduler_cls is None:
            scheduler_config.scheduler_cls = SCHEDULER_CLS
        elif str(scheduler_config.scheduler_cls) != SCHEDULER_CLS:
            raise ValueError(
                f"vllm-dare serves {model_config.architecture} with its own scheduler "
                f"({SCHEDULER_CLS}); got --scheduler-cls {scheduler_config.scheduler_cls}"
            )

        # Every diffusion batch holds whole sequences (prefill-shaped), so CUDA
        # graphs would never be replayed; capturing them would only cost start-up.
        from vllm.config.compilation import CUDAGraphMode

        compilation_config = vllm_config.compilation_config
        if compilation_config.cudagraph_mode is None:
            compilation_config.cudagraph_mode = CUDAGraphMode.NONE

        if cache_config.enable_prefix_caching:
            logger.info(
                "%s: prefix caching disabled (bidirectional attention: a prompt's "
                "keys/values depend on the whole canvas).",
                model_config.architecture,
            )
            cache_config.enable_prefix_caching = False

        max_model_len = model_config.max_model_len
        if scheduler_config.max_num_batched_tokens < max_model_len:
            logger.info(
                "%s: raising max_num_batched_tokens from %d to max_model_len=%d so "
                "one denoising step can hold a whole sequence.",
                model_config.architecture,
                scheduler_config.max_num_batched_tokens,
                max_model_len,
            )
            scheduler_config.max_num_batched_tokens = max_model_len
        if (
            scheduler_config.max_num_scheduled_tokens is not None
            and scheduler_config.max_num_scheduled_tokens < max_model_len
        ):
            scheduler_config.max_num_scheduled_tokens = max_model_len

        if scheduler_config.long_prefill_token_threshold:
            # vLLM caps every running request at this many tokens per step, which
            # would cut a denoising request's whole-sequence forward in two.
            logger.info(
                "%s: long_prefill_token_threshold %d ignored (a denoising step runs "
                "a request's whole sequence).",
                model_config.architecture,
                scheduler_config.long_prefill_token_threshold,
            )
            scheduler_config.long_prefill_token_threshold = 0

        dare = cls._dare_settings(vllm_config)

        generation_config = dict(model_config.try_get_generation_config())
        generation_config.update(
            {
                k: v
                for k, v in model_config.override_generation_config.items()
                if v is not None
            }
        )
        defaults = DenoisingDefaults.from_generation_config(
            family=cls.family,
            mask_token_id=int(hf_config.mask_token_id),
            canvas_length=int(canvas_length),
            generation_config=generation_config,
            dare=dare,
            engine_knobs=cls._engine_knob_defaults(vllm_config),
        )
        vllm_compat.publish_engine_settings(vllm_config, defaults.encode())
        for key in _VLLM_SAMPLING_KEYS:
            model_config.override_generation_config[key] = None
        # A request without max_tokens gets the served canvas (the OpenAI
        # server then takes the smaller of it and what max_model_len leaves
        # after the prompt), not max_model_len - prompt, which passes the canvas.
        default_length = generation_config.get("max_new_tokens")
        if default_length is None or default_length > canvas_length:
            model_config.override_generation_config["max_new_tokens"] = int(canvas_length)

        from vllm.platforms import current_platform

        if current_platform.is_cpu() and not model_config.enforce_eager:
            # The CPU build would compile and warm up the model with
            # torch.compile (minutes on a small machine) for batch shapes a
            # denoising step never has; the diffusion path runs eagerly there.
            logger.info("%s: eager mode on the CPU build (no torch.compile).",
                        model_config.architecture)
            model_config.enforce_eager = True

        validator = validator_name(defaults)
        processors = [
            p
            for p in (model_config.logits_processors or [])
            if not (isinstance(p, str) and p.split(":")[0] == validator.split(":")[0])
        ]
        model_config.logits_processors = processors + [validator]

        if not vllm_config.use_v2_model_runner:
            raise ValueError(
                "vllm-dare needs vLLM's Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER=1); "
                "on the CPU build it also needs Triton, which the plugin's CPU mode "
                "provides (see docs/cpu.md)"
            )


    @staticmethod
    def _engine_knob_defaults(vllm_config) -> dict:
        """Request knobs set as engine defaults in ``--additional-config``: the
        cache policy (``dllm_cache``, ``dllm_cache_refresh``, ``dllm_cache_window``)
        and parallel decoding (``dllm_parallel``, ``dllm_threshold``,
        ``dllm_factor``), checked with the other defaults."""
        from vllm_dare.model_executor.denoising.params import ENGINE_KNOB_KEYS

        additional = vllm_config.additional_config
        if not isinstance(additional, dict):
            return {}
        return {key: additional[key] for key in ENGINE_KNOB_KEYS if key in additional}

    @staticmethod
    def _dare_settings(vllm_config) -> dict | None:
        """Engine DARE settings when ``--attention-backend dare`` is selected.

        The selection is recorded in the denoising defaults (which travel to every
        process, ``vllm_compat.publish_engine_settings``) and removed from the
        attention config: the model's layers are built with the
        DARE backend class directly, so no process needs the plugin's enum member
        before plugins load, and vLLM's CPU platform (which only runs CPU_ATTN)
        does not override it.
        """
        from vllm_dare.cache_policies.dare_reuse import DareSettings

        attention_config = vllm_config.attention_config
        backend = attention_config.backend
        additional = vllm_config.additional_config
        raw = additional.get("dare") if isinstance(additional, dict) else None
        if backend is None or getattr(backend, "name", None) != "DARE":
            if raw is not None:
                raise ValueError(
                    "additional_config['dare'] is set but the DARE backend is not "
                    "selected (--attention-backend dare)"
                )
            return None
        settings = DareSettings.from_engine_config(raw)
        attention_config.backend = None
        logger.info("DARE attention backend: %s", settings.to_dict())
        return settings.to_dict()


class LLaDAEngineConfig(DenoisingEngineConfig):
    family = "llada"


class DreamEngineConfig(DenoisingEngineConfig):
    family = "dream"
