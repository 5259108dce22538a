"""The ensemble's steps up to its decoupled engine, read from the deployed ensemble config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from triton_io.contract import Engine


@dataclass(frozen=True)
class Step:
    model: str
    inputs: Mapping[str, str]  # the step model's input -> ensemble tensor
    outputs: Mapping[str, str]  # the step model's output -> ensemble tensor


@dataclass(frozen=True)
class EnginePlan:
    """How the gateway runs the ensemble itself: the pre-steps unary, then a stream straight to the engine.

    Triton 2.51 does not pass a cancelled ensemble request on to its composing models, so a client that goes
    away would leave the engine generating; a direct engine stream is cancelled at the engine. Token ids are
    detokenized in the gateway with the same code as the `postprocessing` model (gemma3_core.detokenize),
    which also saves that per-token hop.
    """

    pre: tuple[Step, ...]
    engine: Step
    engine_outputs: frozenset[str] = frozenset()  # what the engine model declares (empty: unknown)


def engine_plan(ensemble: Any, decoupled: Mapping[str, bool]) -> EnginePlan | None:
    """None unless the ensemble is pre-steps -> a decoupled step producing `output_ids` -> post-steps."""
    if ensemble.platform != "ensemble":
        return None
    steps = [
        Step(s.model_name, dict(s.input_map), dict(s.output_map)) for s in ensemble.ensemble_scheduling.step
    ]
    engines = [i for i, st in enumerate(steps) if decoupled.get(st.model)]
    if len(engines) != 1 or Engine.OUTPUT_IDS not in steps[engines[0]].outputs:
        return None
    pre = tuple(steps[: engines[0]])
    if any(decoupled.get(st.model) for st in pre):
        return None
    return EnginePlan(pre=pre, engine=steps[engines[0]])
