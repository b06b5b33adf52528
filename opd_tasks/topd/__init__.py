"""TOPD's machinery: per-token signals and regimes (signals.py), near-future probes from cached prefixes
(probes.py), the detectors that tell a real reasoning fork from a surface-form mismatch (detectors.py), and the
entropic optimal-transport distance (ot.py).

The detectors, by name (the `analysis.detector` setting; docs/method.md says which are the paper's):
"""

DETECTORS: dict[str, str] = {
    "window": "the mean loss signal over the student's own next W tokens (no model pass)",
    "probe": "the paper's: the teacher's and the student's K-token continuations from the flagged prefix, compared "
             "(xent or ot)",
    "swap": "ours: the teacher re-reads the student's next W tokens after its own top token in place of y_t",
    "oracle": "the testbed's ground-truth roles (form, filler -> surface; reasoning, answer, fork -> divergent): "
              "the positive control",
}
