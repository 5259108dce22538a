"""triton_io/contract.py against what it describes: the rendered config.pbtxt files and the docs."""

from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from build_engine import render
from gateway.triton.tensors import wire_dtype
from tests.fixtures.repository import RenderedModel, render_target
from triton_io import contract
from triton_io.contract import ENSEMBLE, MODELS, ModelContract, Tensor

DOCS = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def _declared(tensors: object) -> dict[str, Tensor]:
    """Config tensors in the contract's terms (outputs have no `optional` in config.pbtxt)."""
    return {
        t.name: Tensor(t.name, (wire_dtype(t.data_type),), tuple(t.dims), bool(getattr(t, "optional", False)))
        for t in tensors  # type: ignore[attr-defined]
    }


def _differences(
    kind: str, promised: tuple[Tensor, ...], declared: dict[str, Tensor], exact: bool
) -> list[str]:
    problems = []
    for t in promised:
        d = declared.get(t.name)
        if d is None:
            problems.append(f"{kind} {t.name}: in the contract, not declared")
            continue
        if d.dtypes[0] not in t.dtypes:
            problems.append(f"{kind} {t.name}: declared {d.dtype}, contract {t.dtype}")
        if d.dims != t.dims:
            problems.append(f"{kind} {t.name}: declared dims {list(d.dims)}, contract {list(t.dims)}")
        if kind == "input" and d.optional != t.optional:
            problems.append(f"{kind} {t.name}: declared optional={d.optional}, contract {t.optional}")
    if exact:
        problems += [
            f"{kind} {n}: declared, not in the contract" for n in declared.keys() - {t.name for t in promised}
        ]
    return problems


def contract_problems(model: RenderedModel, promised: ModelContract) -> list[str]:
    exact = not promised.extensible
    return [
        f"{model.template}: {p}"
        for p in _differences("input", promised.inputs, _declared(model.config.input), exact)
        + _differences("output", promised.outputs, _declared(model.config.output), exact)
    ] + (
        [f"{model.template}: renders as {model.name!r}, contract {promised.model!r}"]
        if model.name != promised.model
        else []
    )


@pytest.mark.parametrize("target", sorted(render.TARGET_MODELS))
def test_rendered_configs_declare_the_contract(target: str, tmp_path: Path) -> None:
    models = render_target(target, tmp_path)
    assert {m.template for m in models} <= set(MODELS), "a template the contract does not describe"
    problems = [p for m in models for p in contract_problems(m, MODELS[m.template])]
    assert not problems, "\n".join(problems)


def test_a_changed_config_is_caught(tmp_path: Path) -> None:
    (ensemble,) = [m for m in render_target("cpu", tmp_path) if m.template == "ensemble"]
    config = mc.ModelConfig()
    config.CopyFrom(ensemble.config)
    config.input[0].data_type = mc.TYPE_INT32
    del config.input[-1]
    config.output.add(name="extra", data_type=mc.TYPE_INT32, dims=[1])
    problems = contract_problems(RenderedModel("ensemble", "ensemble", "", config), ENSEMBLE)
    assert any("text_input: declared INT32" in p for p in problems), problems
    assert any(f"{ENSEMBLE.inputs[-1].name}: in the contract, not declared" in p for p in problems), problems
    assert any("output extra: declared, not in the contract" in p for p in problems), problems


def test_gateway_sets_are_ensemble_inputs() -> None:
    assert ENSEMBLE.input_names >= contract.LIST_INPUTS | contract.ESSENTIAL_INPUTS
    by_name = {t.name: t for t in ENSEMBLE.inputs}
    assert all(
        by_name[n].dims == (-1,) and by_name[n].dtypes == (contract.BYTES,) for n in contract.LIST_INPUTS
    )


def test_docs_show_the_contract() -> None:
    text = DOCS.read_text()
    assert contract.DOC_BEGIN in text and contract.DOC_END in text, (
        f"{DOCS} lost its generated contract block"
    )
    shown = text.split(contract.DOC_BEGIN, 1)[1].split(contract.DOC_END, 1)[0].strip("\n")
    assert shown == contract.markdown(), f"{DOCS} is stale: regenerate it with `python -m triton_io.contract`"
