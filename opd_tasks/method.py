"""The method as a value: the one place that says what `method:` (opd, opd_suppress, topd, and the baselines
opd_return, opd_matched) switches on.

A `Method` names the pieces of TOPD it uses. `plan(cfg)` turns it, with the `topd:` and `baselines:` sections,
into the exact values the stages read, so no stage ever branches on the method's name:

- `analyze`: whether the analysis stage runs (regimes and token weights); without it every weight is 1;
- `weighting`: the token weights the analysis writes (`TokenWeighting`): a surface token's weight, and the
  extra weight spread over the near future of a divergent token (0 when the method does not spread);
- `bridge`: the bridge loss's weight and decay in the update (`Bridge`), or None when the method has none or
  its weight is 0; the analysis generates the teacher's bridge continuations only when there is one;
- `advantage`: the update's per-token advantage, -k1_t (OPD) or a discounted near-future return (`Return`);
- `samples_per_prompt`: the rollout's samples per prompt (more for compute-matched OPD).

Two baselines a reviewer asks for, with no detector (settings in the `baselines:` section):
- `opd_return`: OPD whose advantage is the discounted near-future return A_t = -sum_{j<=H} decay^j k1_{t+j}:
  the near-future credit TOPD spreads, given to every token without telling forks from surface form;
- `opd_matched`: OPD with `baselines.compute_factor` times the samples per prompt, the extra compute TOPD
  spends (measured: `bench testbed`'s cost ratio), spent on more data instead.

Adding a method (e.g. a baseline the experiment needs) is one `Method(...)` line below, plus, when it needs a new
switch, that switch here and where the stage reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from opd_tasks.config import RunConfig


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    suppress: bool  # surface tokens (high loss, no near-future divergence) get topd.surface_weight instead of 1
    spread: bool  # a divergent token's correction is spread over its near future (topd.spread_*)
    bridge: bool  # the student also follows the teacher's continuation at divergent positions (topd.bridge_*)
    discounted_return: bool = False  # advantage = -(discounted sum of k1 over the next tokens) (baselines.return_*)
    compute_matched: bool = False  # baselines.compute_factor x the samples per prompt

    @property
    def analyze(self) -> bool:
        """Whether the method needs the analysis stage's regimes (every switch does)."""
        return self.suppress or self.spread or self.bridge


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("opd", "standard on-policy distillation: every completion token has weight 1",
           suppress=False, spread=False, bridge=False),
    Method("opd_suppress", "OPD with surface tokens down-weighted to topd.surface_weight",
           suppress=True, spread=False, bridge=False),
    Method("topd", "trajectory-aware OPD: suppression, spread over the near future of divergent tokens, bridge",
           suppress=True, spread=True, bridge=True),
    Method("opd_return", "OPD with a discounted near-future return as advantage (baselines.return_*), no detector",
           suppress=False, spread=False, bridge=False, discounted_return=True),
    Method("opd_matched", "OPD with baselines.compute_factor x the samples per prompt (TOPD's extra compute)",
           suppress=False, spread=False, bridge=False, compute_matched=True),
)}


class TokenWeighting(BaseModel):
    """The per-token weights the analysis writes, from each token's regime (opd_tasks/topd/signals.py):
    `surface` -> surface_weight, otherwise 1; then each `divergent` token t adds spread_weight * spread_decay^j
    to tokens t + j, j = 0..spread_horizon."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    surface_weight: float = Field(default=1.0, ge=0.0)
    spread_weight: float = Field(default=0.0, ge=0.0)
    spread_decay: float = Field(default=0.8, ge=0.0, le=1.0)
    spread_horizon: int = Field(default=0, ge=0)


class Bridge(BaseModel):
    """TOPD's near-future guidance in the update: `weight * -sum_j decay^j log pi_S(c_j | s_t, c_<j)` over the
    teacher's continuation c of each divergent prefix s_t (opd_tasks/training/losses.py, `bridge_nll`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weight: float = Field(gt=0.0)
    decay: float = Field(ge=0.0, le=1.0)


class Return(BaseModel):
    """The discounted near-future return as the update's advantage: A_t = -sum_{j=0..horizon} decay^j k1_{t+j}
    (within the sequence; opd_tasks/training/losses.py, `discounted_return`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    horizon: int = Field(ge=0)
    decay: float = Field(ge=0.0, le=1.0)


@dataclass(frozen=True)
class MethodPlan:
    """What the stages of one run read from its method (see the module docstring)."""

    method: Method
    weighting: TokenWeighting
    bridge: Bridge | None
    advantage: Return | None  # None: the per-token -k1_t
    samples_per_prompt: int

    @property
    def analyze(self) -> bool:
        return self.method.analyze


def plan(cfg: RunConfig) -> MethodPlan:
    """The switches of `cfg.method` with the values of `cfg.topd` and `cfg.baselines`."""
    m, t = METHODS[cfg.method], cfg.topd
    weighting = TokenWeighting(
        surface_weight=t.surface_weight if m.suppress else 1.0,
        spread_weight=t.spread_weight if m.spread else 0.0,
        spread_decay=t.spread_decay if m.spread else TokenWeighting.model_fields["spread_decay"].default,
        spread_horizon=t.spread_horizon if m.spread else 0,
    )
    bridge = Bridge(weight=t.bridge_weight, decay=t.bridge_decay) if m.bridge and t.bridge_weight > 0 else None
    b = cfg.baselines
    advantage = Return(horizon=b.return_horizon, decay=b.return_decay) if m.discounted_return else None
    samples = cfg.rollout.samples_per_prompt
    if m.compute_matched:
        samples = max(samples, round(samples * b.compute_factor))
    return MethodPlan(m, weighting, bridge, advantage, samples)
