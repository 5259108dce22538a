"""A CustomResourceDefinition's openAPIV3Schema as the JSON Schema file check-jsonschema validates with.

    python deploy/k8s/schemas/crd_to_jsonschema.py CRD.yaml v1 SOURCE > deploy/k8s/schemas/KIND.json

Objects with `properties` get `additionalProperties: false` (unless the CRD preserves unknown fields), so a
misspelt field fails here the way the API server's strict field validation rejects it, instead of being
pruned silently. Go's inline case-insensitive flag `(?i)` is not ECMA-262 regex (JSON Schema's dialect): such
a pattern is rewritten with a `[xX]` class per letter (fine for the plain word lists CRDs use it for).
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import yaml


def ecma_pattern(pattern: str) -> str:
    if "(?i)" not in pattern:
        return pattern
    return re.sub(
        r"(?<!\\)[A-Za-z]", lambda m: f"[{m.group().lower()}{m.group().upper()}]", pattern.replace("(?i)", "")
    )


def strict(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: strict(v) for k, v in node.items()}
        if isinstance(out.get("pattern"), str):
            out["pattern"] = ecma_pattern(out["pattern"])
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node


def convert(crd: dict[str, Any], version: str, source: str) -> dict[str, Any]:
    spec = crd["spec"]
    (entry,) = [v for v in spec["versions"] if v["name"] == version]
    schema = strict(entry["schema"]["openAPIV3Schema"])
    group_version = f"{spec['group']}/{version}"
    schema["properties"]["apiVersion"] = {"const": group_version}
    schema["properties"]["kind"] = {"const": spec["names"]["kind"]}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": f"{spec['names']['kind']} {group_version}: openAPIV3Schema of {source}, made strict "
        "by deploy/k8s/schemas/crd_to_jsonschema.py",
        **schema,
    }


def main() -> None:
    path, version, source = sys.argv[1:4]
    with open(path) as f:
        crd = next(d for d in yaml.safe_load_all(f) if d)
    json.dump(convert(crd, version, source), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
