"""Versioned Parquet schemas of every table (DESIGN.md section 3), defined once, here.

Each schema carries its name and version in the Parquet key-value metadata (`opd.schema`,
`opd.schema_version`), so that any reader, including plain `duckdb`/`pyarrow`, can tell what a file is.
Bump `version` when a column changes meaning or type; readers refuse a file whose version differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from storage.errors import ArtifactError, DataError

META_NAME = b"opd.schema"
META_VERSION = b"opd.schema_version"

i32, i64, f32, f64, s, b = pa.int32(), pa.int64(), pa.float32(), pa.float64(), pa.string(), pa.bool_()


@dataclass(frozen=True)
class TableSchema:
    name: str
    version: int
    grain: str
    fields: tuple[pa.Field, ...]

    @property
    def arrow(self) -> pa.Schema:
        return pa.schema(
            list(self.fields),
            metadata={META_NAME: self.name.encode(), META_VERSION: str(self.version).encode()},
        )

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.fields]


def _f(name: str, typ: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


SCHEMAS: dict[str, TableSchema] = {
    t.name: t
    for t in [
        # v2: the teacher's prompt (its context + the student's prompt; null without a teacher context)
        TableSchema("prompts", 2, "prompt", (
            _f("prompt_id", s), _f("prompt", s), _f("prompt_token_ids", pa.list_(i32)),
            _f("answer", s, True), _f("source", s), _f("teacher_prompt_token_ids", pa.list_(i32), True),
        )),
        TableSchema("rollouts", 2, "sampled sequence", (  # v2: teacher_prompt_token_ids, as in prompts
            _f("prompt_id", s), _f("sample_id", i32), _f("prompt_token_ids", pa.list_(i32)),
            _f("token_ids", pa.list_(i32)), _f("logprobs", pa.list_(f32)), _f("text", s),
            _f("finish_reason", s), _f("reward", f32, True), _f("teacher_prompt_token_ids", pa.list_(i32), True),
        )),
        TableSchema("teacher_scores", 1, "token", (
            _f("prompt_id", s), _f("sample_id", i32), _f("pos", i32), _f("token_id", i32),
            _f("teacher_logprob", f32), _f("teacher_entropy", f32, True),
            _f("topk_ids", pa.list_(i32)), _f("topk_logprobs", pa.list_(f32)),
        )),
        TableSchema("tokens", 1, "token", (
            _f("prompt_id", s), _f("sample_id", i32), _f("pos", i32), _f("token_id", i32),
            _f("student_logprob", f32), _f("teacher_logprob", f32), _f("k1", f32),
            _f("rkl_topk", f32, True), _f("student_entropy", f32, True), _f("teacher_entropy", f32, True),
            _f("teacher_rank", i32, True), _f("high_loss", b), _f("near_future_div", f32, True),
            _f("regime", s), _f("weight", f32), _f("role", s, True),
        )),
        TableSchema("probes", 1, "probed position", (
            _f("prompt_id", s), _f("sample_id", i32), _f("pos", i32),
            _f("teacher_continuation", pa.list_(i32)), _f("student_continuation", pa.list_(i32)),
            _f("distance", f32), _f("distance_kind", s),
        )),
        TableSchema("updates", 2, "optimizer step", (  # v2: pg_loss renamed distill_loss
            _f("step", i32), _f("loss", f32), _f("distill_loss", f32), _f("bridge_loss", f32, True),
            _f("kl", f32), _f("grad_norm", f32), _f("lr", f32), _f("tokens_trained", i64),
            _f("weighted_tokens", f32),
        )),
        TableSchema("old_logprobs", 1, "token", (
            _f("prompt_id", s), _f("sample_id", i32), _f("pos", i32), _f("sampling_logprob", f32),
            _f("trainer_logprob", f32),
        )),
        # v2: the reverse KL to the teacher (summed over the answer's tokens; null for the teacher's own answers)
        # and whether the answer hit evaluation.max_new_tokens; v3: `correct` null where there is no reference
        # answer (prompt-only data, data.answer_column null)
        TableSchema("evals", 3, "eval sample", (
            _f("prompt_id", s), _f("sample_id", i32), _f("text", s), _f("answer", s, True),
            _f("reference", s, True), _f("correct", b, True), _f("num_tokens", i32), _f("rkl", f32, True),
            _f("truncated", b),
        )),
    ]
}


def get_schema(name: str) -> TableSchema:
    try:
        return SCHEMAS[name]
    except KeyError:
        raise DataError(f"unknown table schema {name!r}; known: {', '.join(SCHEMAS)}") from None


def conform(table: pa.Table, schema: TableSchema) -> pa.Table:
    """Return `table` with exactly `schema`'s columns, order and types, or raise DataError naming the column.

    Columns may come in any order, and numeric types are cast when the cast is lossless (e.g. int64 -> int32
    of small values); a missing or extra column, a lossy cast or a null in a non-nullable column is an error.
    """
    have = set(table.column_names)
    missing = [c for c in schema.columns if c not in have]
    extra = [c for c in table.column_names if c not in set(schema.columns)]
    if missing:
        raise DataError(f"table {schema.name!r} (v{schema.version}) is missing column(s) {missing}")
    if extra:
        raise DataError(f"table {schema.name!r} (v{schema.version}) has unknown column(s) {extra}")
    arrays = []
    for field in schema.fields:
        col = table.column(field.name)
        if not col.type.equals(field.type):
            try:
                col = col.cast(field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
                raise DataError(
                    f"table {schema.name!r}: column {field.name!r} has type {col.type}, expected "
                    f"{field.type} ({e})"
                ) from None
        if not field.nullable and col.null_count:
            raise DataError(
                f"table {schema.name!r}: column {field.name!r} has {col.null_count} null(s) but is not nullable"
            )
        arrays.append(col)
    return pa.Table.from_arrays(arrays, schema=schema.arrow)


def check_file_schema(arrow_schema: pa.Schema, expected: TableSchema, where: str) -> None:
    """Refuse a Parquet file whose embedded schema name/version differs from `expected`."""
    meta = arrow_schema.metadata or {}
    name = meta.get(META_NAME, b"").decode() or None
    version = meta.get(META_VERSION, b"").decode() or None
    if name != expected.name or version != str(expected.version):
        raise ArtifactError(
            f"{where}: schema {name!r} version {version!r}, expected {expected.name!r} version "
            f"{expected.version} (written by another version of opd-pipeline?)"
        )
