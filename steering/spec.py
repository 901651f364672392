"""The validated steering spec (no torch, no HTTP): what the engines and span code consume.

Convention: `strength` >= 1 is the user-facing knob (1 = off); the paper's `alpha` = 1/strength is
the factor applied to the attention paid to every prompt token outside the steered context.
The request object that produces a spec is `steering.params.SteeringParams`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

# "tool": the results of tool calls (role "tool" messages), context the model should rely on like the user's.
Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = get_args(Role)
DEFAULT_TARGETS = ("user",)  # the paper's rule: the user's turns are the context (--default-steering-targets)
Method = Literal["attention", "cad", "attention+cad", "adacad", "attention+adacad"]
METHODS: tuple[str, ...] = get_args(Method)
# The contrastive methods (each brings a context-free twin row) and the rule each combines the two rows'
# logits with (`steering.cad.CONTRASTS`): "cad" a fixed weight (cad_beta), "adacad" a weight per token.
CONTRAST_RULES: dict[str, str] = {
    "cad": "cad",
    "attention+cad": "cad",
    "adacad": "adacad",
    "attention+adacad": "adacad",
}
CAD_METHODS: tuple[str, ...] = tuple(CONTRAST_RULES)
BETA_METHODS: tuple[str, ...] = tuple(m for m, rule in CONTRAST_RULES.items() if rule == "cad")
NO_BIAS_METHODS = ("cad", "adacad")  # the contrast alone: no attention bias (strength 1)
HeadMap = dict[int, tuple[int, ...]]

# Context-aware decoding (Shi et al. 2023, arXiv 2305.14739): its paper's default weight (0.5; it used 1.0
# on its knowledge-conflict sets). Bounded so that (1 + beta) * logits stays far from overflow.
DEFAULT_CAD_BETA = 0.5
MAX_CAD_BETA = 10.0
# alpha and strength = 1/alpha are both used (the bias is log(alpha); responses report the strength), so
# both must stay finite and normal: alpha in [MIN_ALPHA, 1], strength in [1, MAX_STRENGTH].
MAX_STRENGTH = 1e300
MAX_SPANS = 128  # each span is searched over the whole prompt

# What a spec can use that not every engine serves (`SteeringSpec.features`; the server maps each to the
# engine capability it needs and to its 400).
ATTENTION = "attention"  # the attention bias itself (a strength, given or "auto")
CAD = "cad"  # context-aware decoding (any contrastive method: CAD_METHODS)
AUTO_STRENGTH = "auto_strength"  # strength "auto": measured during prefill


def strength_to_alpha(strength: float) -> float:
    """The one strength <-> alpha conversion. alpha = 1/strength, and the map is its own inverse, so
    `alpha_to_strength` is the same function."""
    return 1.0 / strength


alpha_to_strength = strength_to_alpha
MIN_ALPHA = strength_to_alpha(MAX_STRENGTH)


class SteeringError(ValueError):
    """Invalid steering input. `field` is the dotted request path of the culprit (e.g. "steering.alpha")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class AutoStrength:
    """`strength: "auto"`: per request, the smallest strength in [1, max_strength] whose predicted attention
    of the prompt's last position on the context reaches `target_ratio` (steering.auto_strength)."""

    target_ratio: float = 0.5
    max_strength: float = 4.0


@dataclass(frozen=True, slots=True)
class SteeringSpec:
    """A validated steering request.

    alpha:   factor on attention to non-steered prompt keys, in (0, 1]; 1 = off.
    targets: roles whose message contents are steered (per-message `steer` flags override).
    spans:   substrings of messages that are steered as well (PASTA-style emphasis).
    layers:  layer indices to steer, None = all.
    heads:   layer -> query heads to steer, None = all heads (in the selected layers).
    method:  "attention" (the bias above), "cad" (context-aware decoding: contrast the next-token logits
             with those of a twin prompt without the steered tokens, weight `cad_beta`), "adacad" (the same
             contrast, weighted per token by the two distributions' Jensen-Shannon divergence) or
             "attention+" either (both the bias and the contrast).
    """

    alpha: float = 1.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    spans: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    heads: HeadMap | None = None
    auto: AutoStrength | None = None  # strength "auto": alpha stays 1 until the engine picks one
    method: str = "attention"
    cad_beta: float | None = None  # set exactly when the method is CAD with its fixed weight

    @property
    def cad(self) -> bool:
        """A contrastive method: the request gets a context-free twin."""
        return self.method in CAD_METHODS

    @property
    def contrast(self) -> str | None:
        """The contrast rule of the method (`CONTRAST_RULES`), None without one."""
        return CONTRAST_RULES.get(self.method)

    @property
    def strength(self) -> float:
        return alpha_to_strength(self.alpha)

    @property
    def active(self) -> bool:
        return self.alpha != 1.0

    @property
    def features(self) -> tuple[str, ...]:
        """What of it an engine must support, in the order the server checks it."""
        out = [ATTENTION] if self.active or self.auto is not None else []
        if self.cad:
            out.append(CAD)
        if self.auto is not None:
            out.append(AUTO_STRENGTH)
        return tuple(out)
