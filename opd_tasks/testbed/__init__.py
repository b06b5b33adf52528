"""The embedded testbed: a synthetic arithmetic task with token-level ground truth, its tokenizer, and a
tiny teacher and student (docs/testbed.md)."""

import os

# On a shared CPU, OpenMP threads that spin while waiting make torch many times slower (measured: 3.5 s vs
# 0.45 s per teacher step with another torch process on 2 cores). Passive waiting costs little when alone.
# Only effective if set before torch is first imported; the `opd` CLI and Makefile should export it too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
