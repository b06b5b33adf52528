"""TOPD's machinery: per-token signals and regimes (signals.py), near-future probes from cached prefixes
(probes.py), the detectors that tell a real reasoning fork from a surface-form mismatch (detectors.py), and the
entropic optimal-transport distance (ot.py).

`DETECTORS` is the one table of the detectors (the `analysis.detector` setting; docs/method.md says which are the
paper's): each a record of what it needs and does, with its function named by dotted path, so the config and the
CLI read the table without importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Detector:
    name: str
    description: str
    #: module:function, (candidates, models, cfg, bridge, progress, student_encoded=None) -> Detection
    run: str
    probes: bool  # writes a probes table: examines given positions (else every high-loss token, no probes)
    budgeted: bool  # the positions are each rollout's analysis.probe_budget highest-signal ones (else all)
    skip_last: bool  # never a rollout's last token (it has no near future to read)
    distance: Callable[[Any], str | None]  # the probes table's `distance_kind`, from the AnalysisConfig
    threshold: float | None = None  # its own threshold on D_t; None: analysis.delta decides
    reuses_student_pass: bool = False  # continues from the statistics pass's keys/values (`student_encoded`)
    #: its D_t has a natural zero, so an absolute delta of 0 is a threshold (else a warning says it is not)
    natural_zero: bool = False
    #: its continuations are not bridges: the teacher's bridge is generated at each divergent position, in the
    #: block with an absolute delta, or once the batch's quantile delta is known (the analysis' finish)
    bridges_after: bool = False

    def fn(self) -> Callable:
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)


_D = "opd_tasks.topd.detectors"
DETECTORS: dict[str, Detector] = {d.name: d for d in (
    Detector("window", "the mean loss signal over the student's own next W tokens (no model pass)", f"{_D}:window",
             probes=False, budgeted=False, skip_last=False, distance=lambda cfg: None),
    Detector("probe", "the paper's: the teacher's and the student's K-token continuations from the flagged prefix, "
             "compared (xent or ot)", f"{_D}:probe", probes=True, budgeted=True, skip_last=False,
             distance=lambda cfg: cfg.distance, reuses_student_pass=True),
    Detector("swap", "ours: the teacher re-reads the student's next W tokens after its own top token in place of y_t",
             f"{_D}:swap", probes=True, budgeted=True, skip_last=True, distance=lambda cfg: "swap", natural_zero=True,
             bridges_after=True),
    Detector("oracle", "the testbed's ground-truth roles (form, filler -> surface; reasoning, answer, fork -> "
             "divergent): the positive control", f"{_D}:oracle", probes=True, budgeted=False, skip_last=False,
             distance=lambda cfg: "oracle", threshold=0.0, natural_zero=True),
)}
