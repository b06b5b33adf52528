"""Write configs/data/additions.jsonl: the real recipe's questions (configs/smollm2-context.yaml).

Every "What is a + b?" with a and b in 2..49 (2,304 questions, each with its sum as the reference answer), in a
fixed shuffled order. The recipe's teacher sees four worked examples, each with an operand of 50 or more, so no
example is a question here. Deterministic: tests/unit/test_real_recipe.py regenerates the file and compares bytes.

    python scripts/make_additions.py [OUT]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "configs" / "data" / "additions.jsonl"
LOW, HIGH = 2, 49


def additions() -> str:
    rows = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    random.Random(20261207).shuffle(rows)
    return "".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n" for a, b in rows)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    out.write_text(additions(), encoding="utf-8")
    print(f"wrote {out} ({(HIGH - LOW + 1) ** 2} questions)")
