"""Prompt validation shaped like ComfyUI's execution.validate_prompt / validate_inputs."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from .nodes import NodeDef
from .profile import cycle_errors, find_cycle, missing_node_type

log = logging.getLogger(__name__)

# The real tracebacks point into ComfyUI; the traces elide the code the same way.
_TB_PROMPT = '  File "<comfyui>/execution.py", line 1010, in validate_prompt\n    <code elided>\n'
_TB_INPUTS = '  File "<comfyui>/execution.py", line 788, in validate_inputs\n    <code elided>\n'


def _err(kind: str, message: str, details: str = "", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One error object: {type, message, details, extra_info}."""
    return {"type": kind, "message": message, "details": details, "extra_info": extra or {}}


@dataclass
class Verdict:
    """Result of validate_prompt: ok, top-level error, outputs to execute, per-node errors."""

    ok: bool
    error: dict[str, Any] | None = None
    outputs: list[str] = field(default_factory=list)
    node_errors: dict[str, Any] = field(default_factory=dict)


def _types_match(received: Any, wanted: Any) -> bool:
    """ComfyUI's validate_node_input: equal, '*' on either side, or overlapping unions."""
    if isinstance(wanted, list):
        wanted = "COMBO"
    if received == wanted:
        return True
    if not isinstance(received, str) or not isinstance(wanted, str):
        return False
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in wanted.split(",")}
    return "*" in got or "*" in want or bool(got & want)


def _convert(kind: Any, val: Any) -> Any:
    """In-place widget conversion done by validation ("512" -> 512)."""
    if kind == "INT":
        return int(val)
    if kind == "FLOAT":
        return float(val)
    if kind == "STRING":
        return str(val)
    if kind == "BOOLEAN":
        return bool(val)
    return val


class _Validator:
    """Recursive per-node validation with the `validated` memo ComfyUI uses."""

    def __init__(self, registry: dict[str, NodeDef], prompt: dict[str, Any], image_exists: Callable[[str], bool]) -> None:
        self.registry = registry
        self.prompt = prompt
        self.image_exists = image_exists
        self.validated: dict[str, tuple[bool, list[dict[str, Any]], str]] = {}

    def node(self, unique_id: str) -> tuple[bool, list[dict[str, Any]], str]:
        """Validate one node and (recursively) what it links to; memoised."""
        if unique_id in self.validated:
            return self.validated[unique_id]
        inputs = self.prompt[unique_id]["inputs"]
        node = self.registry[self.prompt[unique_id]["class_type"]]
        errors: list[dict[str, Any]] = []
        valid = True
        for category, x, spec in node.inputs():
            kind = spec[0]
            extra = spec[1] if len(spec) > 1 else {}
            info = [kind, extra]
            if x not in inputs:
                if category == "required":
                    errors.append(_err("required_input_missing", "Required input is missing", x, {"input_name": x}))
                continue
            val = inputs[x]
            if isinstance(val, list):
                if not self._link(x, val, kind, info, errors):
                    valid = False
                continue
            try:
                if isinstance(val, dict) and "__value__" in val:
                    val = val["__value__"]
                    inputs[x] = val
                val = _convert(kind, val)
                inputs[x] = val
            except Exception as ex:
                errors.append(_err(
                    "invalid_input_type", f"Failed to convert an input value to a {kind} value", f"{x}, {val}, {ex}",
                    {"input_name": x, "input_config": info, "received_value": val, "exception_message": str(ex)}))
                continue
            if x in node.validate_inputs:
                continue
            if "min" in extra and val < extra["min"]:
                errors.append(_err("value_smaller_than_min", f"Value {val} smaller than min of {extra['min']}", x,
                                   {"input_name": x, "input_config": info, "received_value": val}))
                continue
            if "max" in extra and val > extra["max"]:
                errors.append(_err("value_bigger_than_max", f"Value {val} bigger than max of {extra['max']}", x,
                                   {"input_name": x, "input_config": info, "received_value": val}))
                continue
            if isinstance(kind, list) and val not in kind:
                config: Any = info
                listed = str(kind)
                if len(kind) > 20:  # ComfyUI does not echo huge lists
                    listed, config = f"(list of length {len(kind)})", None
                errors.append(_err("value_not_in_list", "Value not in list", f"{x}: '{val}' not in {listed}",
                                   {"input_name": x, "input_config": config, "received_value": val}))
        for x in node.validate_inputs:
            if x in inputs and not isinstance(inputs[x], list) and not self.image_exists(str(inputs[x])):
                errors.append(_err("custom_validation_failed", "Custom validation failed for node",
                                   f"{x} - Invalid image file: {inputs[x]}", {"input_name": x}))
        result = (not errors and valid, errors, unique_id)
        self.validated[unique_id] = result
        return result

    def _link(self, x: str, val: list[Any], kind: Any, info: list[Any], errors: list[dict[str, Any]]) -> bool:
        """Check a [node_id, slot] link; False when the upstream node is invalid."""
        if len(val) != 2:
            errors.append(_err("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                               x, {"input_name": x, "input_config": info, "received_value": val}))
            return True
        o_id = val[0]
        upstream = self.registry[self.prompt[o_id]["class_type"]]  # KeyError for a missing node, like ComfyUI
        received = upstream.output[val[1]]
        if not _types_match(received, kind):
            errors.append(_err(
                "return_type_mismatch", "Return type mismatch between linked nodes",
                f"{x}, received_type({received}) mismatch input_type({kind})",
                {"input_name": x, "input_config": info, "received_type": received, "linked_node": val}))
            return True
        try:
            return self.node(o_id)[0] is not False
        except Exception as ex:
            self.validated[o_id] = (False, [_err(
                "exception_during_inner_validation", "Exception when validating inner node", str(ex),
                {"input_name": x, "input_config": info, "exception_message": str(ex),
                 "exception_type": type(ex).__name__, "traceback": [_TB_INPUTS], "linked_node": val})], o_id)
            return False


def validate_prompt(
    registry: dict[str, NodeDef],
    prompt: Any,
    image_exists: Callable[[str], bool],
    partial_targets: list[str] | None = None,
    current: bool = False,
) -> Verdict:
    """Validate an API-format graph; converts widget values in place like ComfyUI (current: 0.12+ errors)."""
    if not isinstance(prompt, dict):
        return Verdict(False, _err("prompt_no_outputs", "Prompt has no outputs"))
    outputs: list[str] = []
    for x, node in prompt.items():
        if current and (not isinstance(node.get("class_type"), str) or node["class_type"] not in registry):
            return Verdict(False, missing_node_type(x, node))
        if "class_type" not in node:
            return Verdict(False, _err("invalid_prompt",
                                       "Cannot execute because a node is missing the class_type property.",
                                       f"Node ID '#{x}'"))
        class_type = node["class_type"]
        node_def = registry.get(class_type) if isinstance(class_type, str) else None
        if node_def is None:
            return Verdict(False, _err("invalid_prompt", f"Cannot execute because node {class_type} does not exist.",
                                       f"Node ID '#{x}'"))
        node.setdefault("inputs", {})
        if node_def.output_node and (partial_targets is None or x in partial_targets):
            outputs.append(x)
    if not outputs:
        return Verdict(False, _err("prompt_no_outputs", "Prompt has no outputs"))
    cycle = find_cycle(prompt) if current else None
    if cycle:
        error, cycle_node_errors = cycle_errors(prompt, cycle)
        return Verdict(False, error, [], cycle_node_errors)

    checker = _Validator(registry, prompt, image_exists)
    good: list[str] = []
    failed: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    for o in outputs:
        try:
            valid, reasons, _ = checker.node(o)
        except Exception as ex:
            valid = False
            reasons = [_err("exception_during_validation", "Exception when validating node", str(ex),
                            {"exception_type": type(ex).__name__, "traceback": [_TB_PROMPT, _TB_INPUTS]})]
            checker.validated[o] = (False, reasons, o)
        if valid is True:
            good.append(o)
            continue
        failed.append((o, reasons))
        # Like ComfyUI, every invalid node validated so far is charged to this output.
        for node_id, (ok, why, _) in checker.validated.items():
            if ok is not True and why:
                entry = node_errors.setdefault(node_id, {
                    "errors": why, "dependent_outputs": [], "class_type": prompt[node_id]["class_type"]})
                entry["dependent_outputs"].append(o)
    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for _, errs in failed for e in errs)
        return Verdict(False, _err("prompt_outputs_failed_validation", "Prompt outputs failed validation", details),
                       [], node_errors)
    return Verdict(True, None, good, node_errors)
