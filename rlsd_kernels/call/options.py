"""The options of one call, by name: the policy-loss options and the distillation options, each field
with its default, its range and its doc. The public functions take exactly these keywords (a test
holds their signatures to these tables), so a keyword means the same thing, with the same check,
everywhere.
"""

from __future__ import annotations

import dataclasses
import math

from ..launch.torch_opsd import FORWARD_KL, REVERSE_KL
from ..reference import CREDIT_BASES, KL_ESTIMATORS, OPSD_DIVERGENCES, RATIO_LEVELS, SURROGATES
from ..scalars import real_number


def _field(default, doc, ok=None, what="", choices=None, nullable=False):
    meta = dict(doc=doc, ok=ok, what=what, choices=choices, nullable=nullable or default is None)
    return dataclasses.field(default=default, metadata=meta)


def _positive(v):
    return 0 < v < math.inf


def _unit(v):
    return 0 <= v < 1


def _finite(v):
    return abs(v) < math.inf


def _non_negative(v):
    return 0 <= v < math.inf


class _Checked:
    """Checks and normalises every field after construction: numbers to floats within their range,
    choices among their names; each error names its keyword."""

    # ``(name, default, metadata)`` of every field, set by ``specs`` below (plain tuples, which
    # torch.compile traces where it cannot trace ``dataclasses.fields``).
    SPECS: tuple = ()

    def _unchecked(self):
        """Fields a derived setting has replaced after their check."""
        return ()

    def __post_init__(self):
        for name, _, meta in self.SPECS:
            if name in self._unchecked():
                continue
            value = getattr(self, name)
            if meta.get("choices") is not None:
                # By type too: 1 == True, so a plain ``in`` let 0 and 1 stand for a switch.
                if not any(type(value) is type(c) and value == c for c in meta["choices"]):
                    raise ValueError(f"{name} must be one of {meta['choices']}, got {value!r}")
            elif meta.get("ok") is not None:
                value = real_number(name, value, allow_none=meta["nullable"])
                if value is not None and not meta["ok"](value):
                    raise ValueError(f"{name} must be {meta['what']}, got {value!r}")
                object.__setattr__(self, name, value)

    @classmethod
    def keywords(cls) -> dict:
        """The public keywords and their defaults."""
        return {name: default for name, default, meta in cls.SPECS if meta.get("doc") is not None}

    @classmethod
    def pick(cls, kwargs: dict, **derived):
        """An instance from the public keywords found in ``kwargs`` (e.g. a function's ``locals()``)."""
        return cls(**{k: kwargs[k] for k in cls.keywords() if k in kwargs}, **derived)


@dataclasses.dataclass(frozen=True)
class PolicyOptions(_Checked):
    """The policy loss (RLSD, GRPO/DAPO with ``lam=0``): see ``reference.rlsd_token_terms``."""

    eps_w: float = _field(0.2, "credit-weight clip: w in [1 - eps_w, 1 + eps_w]", _unit, "in [0, 1)")
    lam: float = _field(1.0, "credit mix: A_hat = A * ((1 - lam) + lam * w); 0 is GRPO", lambda v: 0 <= v <= 1,
                        "in [0, 1]")
    clip_low: float = _field(0.2, "PPO clip below: 1 - clip_low", _unit, "in [0, 1)")
    clip_high: float = _field(0.28, "PPO clip above: 1 + clip_high", _non_negative, "a finite number >= 0")
    dual_clip: float | None = _field(3.0, "dual clip constant for A_hat < 0 (None disables it)",
                                     lambda v: 1 < v < math.inf, "None or a finite number > 1", nullable=True)
    temperature: float = _field(1.0, "logits are divided by it", _positive, "a positive finite number")
    surrogate: str = _field("ppo", "'ppo' clipped surrogate, 'cispo' or 'sapo' (soft gate)", choices=SURROGATES)
    sapo_tau_pos: float = _field(1.0, "SAPO gate temperature where A > 0", _positive, "a positive finite number")
    sapo_tau_neg: float = _field(1.05, "SAPO gate temperature where A <= 0", _positive, "a positive finite number")
    ratio_level: str = _field("token", "'token' ratios or 'sequence' (GSPO-token)", choices=RATIO_LEVELS)
    eps_w_low: float | None = _field(None, "credit clip below (default eps_w)", _unit, "None or in [0, 1)")
    eps_w_high: float | None = _field(None, "credit clip above (default eps_w)", _non_negative,
                                      "None or finite, >= 0")
    credit_base: str = _field("current", "delta = lp_T - sg(lp_S) ('current') or lp_T - lp_old ('old')",
                              choices=CREDIT_BASES)
    credit_negative_only: bool = _field(False, "reweight only tokens with A < 0", choices=(False, True))
    tis_level: str = _field("token", "truncated importance sampling per 'token' or 'sequence'",
                            choices=RATIO_LEVELS)
    tis_cap: float = _field(2.0, "cap of the truncated importance weight", _positive, "a positive finite number")
    kl_coef: float = _field(0.0, "weight of the KL term to ref_logprobs", _finite, "a finite number")
    kl_estimator: str = _field("k3", "'k1', 'k2' or 'k3'", choices=KL_ESTIMATORS)
    entropy_coef: float = _field(0.0, "entropy bonus: adds -entropy_coef * H", _finite, "a finite number")
    # Derived per call, not keywords.
    want_entropy: bool = dataclasses.field(default=False, metadata=dict(doc=None))
    num_seqs: int = dataclasses.field(default=0, metadata=dict(doc=None))
    # Precomputed importance weights (``is_weights``) take the importance weight's place, uncapped.
    precomputed_is: bool = dataclasses.field(default=False, metadata=dict(doc=None))

    def _unchecked(self):
        return ("tis_cap",) if self.precomputed_is else ()

    def __post_init__(self):
        super().__post_init__()
        for side in ("eps_w_low", "eps_w_high"):
            if getattr(self, side) is None:
                object.__setattr__(self, side, self.eps_w)
        object.__setattr__(self, "want_entropy", bool(self.want_entropy or self.entropy_coef != 0))
        if self.precomputed_is:
            object.__setattr__(self, "tis_cap", math.inf)


@dataclasses.dataclass(frozen=True)
class DistillOptions(_Checked):
    """On-policy self-distillation: see ``reference.opsd_token_divergence``."""

    divergence: str = _field("jsd", "'forward_kl', 'reverse_kl', 'jsd' or 'sampled_token'", choices=OPSD_DIVERGENCES)
    beta: float = _field(0.5, "JSD mixture weight of the teacher", lambda v: 0 <= v <= 1, "in [0, 1]")
    token_clip: float | None = _field(None, "clip of each token's divergence (None: no clip)", _finite,
                                      "None or a finite number")
    alpha: float = _field(1.0, "weight of the distillation term", _non_negative, "a finite number >= 0")
    # Whether the policy term is added (GRPO+OPSD); not a keyword.
    grpo: bool = dataclasses.field(default=False, metadata=dict(doc=None))

    @property
    def div(self) -> int:
        """The kernels' ``DIV``: JSD with ``beta`` 0 or 1 is the forward or reverse KL (TRL's convention)."""
        if self.divergence == "jsd" and self.beta in (0, 1):
            return FORWARD_KL if self.beta == 0 else REVERSE_KL
        return OPSD_DIVERGENCES.index(self.divergence)


def specs(cls):
    """Records ``cls``'s fields as ``cls.SPECS``."""
    cls.SPECS = tuple((f.name, f.default, dict(f.metadata)) for f in dataclasses.fields(cls))
    return cls


specs(PolicyOptions)
specs(DistillOptions)

# Keywords whose default differs between entry points on purpose: {function name: {keyword: default}}.
DEFAULT_OVERRIDES = {
    "grpo_opsd_loss": {"lam": 0.0},
    "grpo_opsd_linear_loss": {"lam": 0.0},
}
