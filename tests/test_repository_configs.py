"""Every rendered config.pbtxt (cpu and gpu targets) against Triton's own protobuf schema.

Generic over whatever `render.plan()` produces: parses with `tritonclient.grpc.model_config_pb2` +
`text_format` (what tritonserver itself parses), no `${...}` left, and the ensemble wiring is consistent:
every tensor a step consumes is an ensemble input or produced by another step, the consumed/produced names
exist in the step model's config, dtypes agree and shapes are compatible, every required model input is
fed, every ensemble output is produced. For the GPU `tensorrt_llm` model the `parameters` keys must be ones
NVIDIA's C++ backend reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from build_engine import render
from tests.fixtures.repository import render_target


@dataclass
class Model:
    cfg: object  # model_config_pb2.ModelConfig
    text: str


@pytest.fixture(params=["cpu", "gpu"])
def rendered(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Model]:
    models = {}
    for m in render_target(request.param, tmp_path):
        assert "${" not in m.text, f"{m.template}: unfilled placeholder"
        assert m.config.name == m.name, f"{m.template}: name {m.config.name!r} != directory {m.name!r}"
        models[m.name] = Model(m.config, m.text)
    return models


def _full_shape(cfg: object, dims: list[int]) -> list[int]:
    # With max_batch_size > 0 Triton prepends the batch dimension to `dims`.
    return ([-1] if cfg.max_batch_size > 0 else []) + list(dims)


def _compatible(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def _tensors(cfg: object, kind: str) -> dict[str, object]:
    return {t.name: t for t in getattr(cfg, kind)}


def test_configs_parse_and_are_complete(rendered: dict[str, Model]) -> None:
    for name, m in rendered.items():
        assert m.cfg.backend or m.cfg.platform, f"{name}: neither backend nor platform"
        for t in [*m.cfg.input, *m.cfg.output]:
            assert t.data_type != mc.TYPE_INVALID, f"{name}.{t.name}: no data_type"
            assert list(t.dims), f"{name}.{t.name}: no dims"


def wiring_problems(models: dict[str, object]) -> list[str]:
    """What Triton's ensemble validation (ensemble_utils.cc) would reject, plus unfed required inputs."""
    problems: list[str] = []
    ensembles = [m for m in models.values() if m.platform == "ensemble"]
    if not ensembles:
        return ["no ensemble model rendered"]
    for e in ensembles:
        sources: dict[str, tuple[int, list[int]]] = {
            t.name: (t.data_type, _full_shape(e, t.dims)) for t in e.input
        }
        produced_by: dict[str, str] = {}
        steps = list(e.ensemble_scheduling.step)
        if not steps:
            problems.append(f"{e.name}: no steps")
        # Pass 1: what every step produces (steps may be listed in any order).
        for step in steps:
            if step.model_name not in models:
                problems.append(f"{e.name}: step model {step.model_name!r} is not in the repository")
                continue
            model = models[step.model_name]
            # "batchable ensemble can include non-batchable models as long as the expanded shapes are
            # consistent", but a batching model must allow the ensemble's batch size.
            if 0 < model.max_batch_size < e.max_batch_size:
                problems.append(
                    f"{step.model_name}: max_batch_size {model.max_batch_size} < ensemble's "
                    f"{e.max_batch_size}"
                )
            outs = _tensors(model, "output")
            for model_out, ens_tensor in step.output_map.items():
                if model_out not in outs:
                    problems.append(
                        f"{step.model_name} has no output {model_out!r} (mapped to {ens_tensor!r})"
                    )
                    continue
                if ens_tensor in produced_by or ens_tensor in sources:
                    problems.append(f"{ens_tensor!r} is produced twice")
                produced_by[ens_tensor] = step.model_name
                t = outs[model_out]
                sources[ens_tensor] = (t.data_type, _full_shape(model, t.dims))
        # Pass 2: what every step consumes.
        for step in steps:
            if step.model_name not in models:
                continue
            model = models[step.model_name]
            ins = _tensors(model, "input")
            for model_in, ens_tensor in step.input_map.items():
                where = f"{step.model_name}.{model_in} <- {ens_tensor!r}"
                if model_in not in ins:
                    problems.append(f"{step.model_name} has no input {model_in!r}")
                    continue
                if ens_tensor not in sources:
                    problems.append(f"{where}: nothing produces it")
                    continue
                dtype, shape = sources[ens_tensor]
                t = ins[model_in]
                if dtype != t.data_type:
                    problems.append(
                        f"{where}: input is {mc.DataType.Name(t.data_type)}, tensor is "
                        f"{mc.DataType.Name(dtype)}"
                    )
                full = _full_shape(model, t.dims)
                if not _compatible(shape, full):
                    problems.append(f"{where}: input shape {full} (batch dim included), tensor shape {shape}")
            required = {t.name for t in model.input if not t.optional}
            if not required <= set(step.input_map):
                problems.append(
                    f"{step.model_name}: required inputs not fed: {sorted(required - set(step.input_map))}"
                )
        for out in e.output:
            if out.name not in produced_by:
                problems.append(f"{e.name} output {out.name!r} is produced by no step")
            elif sources[out.name][0] != out.data_type:
                problems.append(f"{e.name} output {out.name}: dtype differs from its producer")
    return problems


def test_ensemble_wiring(rendered: dict[str, Model]) -> None:
    problems = wiring_problems({name: m.cfg for name, m in rendered.items()})
    assert not problems, "ensemble wiring:\n  " + "\n  ".join(problems)


def test_gpu_tensorrt_llm_parameters(tmp_path: Path) -> None:
    from build_engine.gpu.repository import (
        REQUIRED_PARAMETER_KEYS,
        UPSTREAM_PARAMETER_KEYS,
        tensorrt_llm_values,
    )
    from build_engine.gpu.settings import BuildSettings

    s = BuildSettings(work_dir=tmp_path)
    values = {**tensorrt_llm_values(s), "model_name": "tensorrt_llm"}
    template = (render.TEMPLATES_DIR / "tensorrt_llm" / "config.pbtxt").read_text()
    assert render.placeholders(template) == set(values), "template and tensorrt_llm_values disagree"
    cfg = text_format.Parse(render.fill(template, values, where="tensorrt_llm"), mc.ModelConfig())
    assert cfg.backend == "tensorrtllm"
    assert cfg.model_transaction_policy.decoupled is True
    keys = set(cfg.parameters)
    assert keys <= UPSTREAM_PARAMETER_KEYS, (
        f"keys the C++ backend does not read: {sorted(keys - UPSTREAM_PARAMETER_KEYS)}"
    )
    assert keys >= REQUIRED_PARAMETER_KEYS
    p = {k: v.string_value for k, v in cfg.parameters.items()}
    assert p["max_attention_window_size"] == "1024,1024,1024,1024,1024,131072"
    assert p["gpt_model_type"] == "inflight_fused_batching"
    assert p["enable_kv_cache_reuse"] == "true" and p["enable_chunked_context"] == "true"
    assert p["batch_scheduler_policy"] in ("guaranteed_no_evict", "max_utilization")
    assert 0 < float(p["kv_cache_free_gpu_mem_fraction"]) < 1
    assert p["gpt_model_path"] == str(s.engine_dir)
    ins = _tensors(cfg, "input")
    # The contract in docs/architecture.md (upstream names and dtypes).
    contract = {
        "input_ids": mc.TYPE_INT32,
        "input_lengths": mc.TYPE_INT32,
        "request_output_len": mc.TYPE_INT32,
        "end_id": mc.TYPE_INT32,
        "pad_id": mc.TYPE_INT32,
        "streaming": mc.TYPE_BOOL,
        "runtime_top_k": mc.TYPE_INT32,
        "runtime_top_p": mc.TYPE_FP32,
        "temperature": mc.TYPE_FP32,
        "repetition_penalty": mc.TYPE_FP32,
        "presence_penalty": mc.TYPE_FP32,
        "frequency_penalty": mc.TYPE_FP32,
        "seed": mc.TYPE_UINT64,
        "stop_words_list": mc.TYPE_INT32,
        "bad_words_list": mc.TYPE_INT32,
        "exclude_input_in_output": mc.TYPE_BOOL,
        "return_num_input_tokens": mc.TYPE_BOOL,
        "return_num_output_tokens": mc.TYPE_BOOL,
        "prompt_vocab_size": mc.TYPE_INT32,
        "prompt_table_extra_ids": mc.TYPE_UINT64,
        "lora_task_id": mc.TYPE_UINT64,
        "lora_config": mc.TYPE_INT32,
        "guided_decoding_guide_type": mc.TYPE_STRING,
        "guided_decoding_guide": mc.TYPE_STRING,
    }
    for name, dtype in contract.items():
        assert ins[name].data_type == dtype, name
    assert ins["prompt_embedding_table"].data_type == mc.TYPE_BF16  # = the bf16 engine's weights
    outs = _tensors(cfg, "output")
    assert outs["output_ids"].data_type == mc.TYPE_INT32 and list(outs["output_ids"].dims) == [-1, -1]
    assert {"sequence_length", "num_input_tokens", "num_output_tokens"} <= set(outs)


def _engine_parameters(target: str, tmp: Path) -> dict[str, str]:
    (engine,) = [m for m in render_target(target, tmp / target) if m.name == "tensorrt_llm"]
    return {k: v.string_value for k, v in engine.config.parameters.items()}


def test_cpu_engine_honours_the_gpu_engine_parameters(tmp_path: Path) -> None:
    """Every parameter the GPU engine config sets is honoured by the reference engine or listed GPU-only."""
    from cpu_engine.deployment import GPU_ONLY_PARAMETERS, HONOURED_PARAMETERS, EngineParameters

    gpu, cpu = _engine_parameters("gpu", tmp_path), _engine_parameters("cpu", tmp_path)
    assert not set(HONOURED_PARAMETERS) & set(GPU_ONLY_PARAMETERS)
    unlisted = set(gpu) - set(HONOURED_PARAMETERS) - set(GPU_ONLY_PARAMETERS)
    assert not unlisted, (
        f"GPU engine parameters neither honoured on CPU nor listed GPU-only: {sorted(unlisted)}"
    )
    stale = (set(HONOURED_PARAMETERS) | set(GPU_ONLY_PARAMETERS)) - set(gpu)
    assert not stale, f"listed but no longer set by the GPU config: {sorted(stale)}"
    assert all(reason for reason in GPU_ONLY_PARAMETERS.values())
    for key, (_, same_value) in HONOURED_PARAMETERS.items():
        assert key in cpu, f"the reference engine's config does not carry {key!r}"
        if same_value:
            assert cpu[key] == gpu[key], f"{key}: cpu {cpu[key]!r} != gpu {gpu[key]!r}"
    # ... and the engine reads them as the GPU backend does.
    as_read = EngineParameters.from_model_config(
        {"parameters": {k: {"string_value": v} for k, v in cpu.items()}}
    )
    assert as_read.exclude_input_in_output is (gpu["exclude_input_in_output"] == "true")
    assert as_read.max_beam_width == int(gpu["max_beam_width"])


def test_cpu_engine_serves_the_weights_tests_take_references_from(tmp_path: Path) -> None:
    """Greedy references (tests/fixtures/triton.py::hf_model) come from load_model's default weight
    dtype: the rendered reference engine must serve that dtype."""
    from cpu_engine.engine import DEFAULT_WEIGHT_DTYPE
    from cpu_engine.packed_linear import WEIGHT_DTYPES

    assert DEFAULT_WEIGHT_DTYPE in WEIGHT_DTYPES
    assert _engine_parameters("cpu", tmp_path)["weight_dtype"] == DEFAULT_WEIGHT_DTYPE
