"""The one check of a request against what the engine serves (`ModelInfo.capabilities`): each feature a
request can use names the capability it needs and the 400 that refuses it."""

from __future__ import annotations

from dataclasses import dataclass

from ctxsteer.server.engine.interface import Capability, ModelInfo
from ctxsteer.server.errors import bad_request
from ctxsteer.steering import spec

_PREFILL = "measures the prompt's attention during prefill, which this engine (--engine vllm) does not"
INDICATOR_AUTO = "indicator_auto"
CONTEXT_REPORT = "context_report"


@dataclass(frozen=True, slots=True)
class Feature:
    capability: Capability
    param: str
    code: str
    message: (
        str | None
    )  # None: the engine's own reason (ModelInfo.steering_unsupported); {value}: the request's


FEATURES: dict[str, Feature] = {
    spec.ATTENTION: Feature(Capability.STEERING, "steering", "steering_unsupported", None),
    spec.CAD: Feature(
        Capability.CAD,
        "steering.method",
        "unsupported_method",
        "steering.method {value!r} (context-aware decoding) needs the local engine with --max-num-seqs of at "
        "least 2 (its context-free twin takes a second row); this server cannot run it.",
    ),
    spec.AUTO_STRENGTH: Feature(
        Capability.PREFILL_ATTENTION,
        "steering.strength",
        "unsupported_auto_strength",
        f'steering.strength "auto" {_PREFILL}; give a number.',
    ),
    INDICATOR_AUTO: Feature(
        Capability.PREFILL_ATTENTION,
        "context_indicator",
        "unsupported_indicator_mode",
        f'context_indicator "auto" {_PREFILL}; send "on" or "off".',
    ),
    CONTEXT_REPORT: Feature(
        Capability.PREFILL_ATTENTION,
        "report.context_attention",
        "unsupported_report",
        "report.context_attention is not available with this engine (the local engine measures it; "
        "--engine vllm does not).",
    ),
}


def require(info: ModelInfo, feature: str, value: object = None) -> None:
    """400 when the engine lacks what `feature` needs (`value` fills the message, e.g. the method)."""
    f = FEATURES[feature]
    if f.capability not in info.capabilities:
        message = (info.steering_unsupported or "") if f.message is None else f.message.format(value=value)
        raise bad_request(message, f.param, f.code)
