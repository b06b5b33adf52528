"""The embedded testbed: a synthetic arithmetic task with token-level ground truth, its tokenizer, and a
tiny teacher and student (docs/testbed.md)."""
