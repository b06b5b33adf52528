"""Sharded stages: a row-parallel stage's work split into N shards, each stored as a part, merged into one artifact.

A stage registered with `shards=Shards(...)` (rollout, score, analyze, evaluate) declares how its work splits:

- `units(ctx, inputs)`: its input rows (prompts, sequences) in the order its batches take them;
- `block(inputs)`: how many units one of its batches holds. Shard boundaries fall on multiples of it, so every
  batch, and the seed of every batch (derived from the run's seed and the batch's index in that order, i.e. from
  its rows), is the same whatever N is;
- `part(ctx, inputs, units)`: the rows of each of its output tables (the stage's `outputs`) for those units;
- `whole(inputs)`: why these inputs cannot be split, if they cannot (analyze with a loss signal that needs the
  student's pass over every sequence before any is analysed): the stage then runs as one part, with a warning.

Its registered function merges: `merge(ctx, inputs, parts) -> ArtifactRef` publishes the stage's artifact from
all parts (the unsharded stage is the same merge over one part that holds every unit). So with the `hf` backend
the artifact's bytes do not depend on N, nor on which process ran which shard, as long as the processes run torch
with the same number of CPU threads (tests/unit/test_sharding.py: N = 1, 2, 3 give byte-identical artifacts).
vLLM's numerics depend on its batches: its shards get the same requests and seeds, not always the same bytes.

With N > 1 each shard's rows are a part artifact, `<stage>.part/<part key>` (the part key: the stage's key and
the shard's span), so a failed shard is retried alone and a rerun recomputes only the parts that are missing; the
stage's artifact is published, atomically like any other, only after every part exists. Parts are in no run's
lineage: `opd gc` removes them (a failed stage's too, whose rerun then recomputes every shard). N is
`orchestration.shards` (or `orchestration.stage_shards.<stage>`), which is in no cache key.

Who runs the parts (flows/runners.py): the plain driver computes them one after the other in its process; the
Prefect flow runs each as its own task run in a process pool (inline) or as a flow run of the stage's deployment
(one per shard, on a work pool), then merges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from storage.hashing import sha256_json
from storage.refs import ArtifactRef

if TYPE_CHECKING:
    from opd_tasks.stages.registry import Stage, StageContext, StageInputs

log = logging.getLogger(__name__)
_told_whole: set[tuple[str, str]] = set()  # (stage, key) whose "runs as one part" warning was logged


@dataclass(frozen=True)
class Units:
    """The units one part computes: input row indices, in the stage's batch order (None: every row, the
    unsharded stage), and the position (in that order) of the first one, a multiple of the stage's block (a shard
    starts on a batch boundary)."""

    rows: list[int] | None
    start: int

    def of(self, table: pa.Table) -> pa.Table:
        """`table`'s rows for these units, in row order."""
        return table if self.rows is None else table.take(sorted(self.rows))


@dataclass(frozen=True)
class Part:
    """One part's units and its rows of each of the stage's output tables."""

    units: Units
    tables: dict[str, pa.Table]

    @property
    def table(self) -> pa.Table:
        """The rows of a one-table stage."""
        (only,) = self.tables.values()
        return only


@dataclass(frozen=True)
class Shards:
    """How a row-parallel stage splits its work (module docstring)."""

    units: Callable[[StageContext, Any], list[int]]
    block: Callable[[Any], int]
    part: Callable[[StageContext, Any, Units], dict[str, pa.Table]]  # {table: rows}, for every one of `outputs`
    whole: Callable[[Any], str | None] = lambda inputs: None


@dataclass(frozen=True)
class Span:
    """Shard `index` of `count`: positions [start, stop) of the stage's units (in batch order)."""

    index: int
    count: int
    start: int
    stop: int


def spans(units: int, block: int, shards: int) -> list[Span]:
    """`shards` contiguous spans of `units` units, each a whole number of `block`-unit batches (the last batch may
    be short), as even as whole batches allow; fewer spans when there are fewer batches than shards."""
    batches = max(1, -(-units // block))
    count = max(1, min(shards, batches))
    cuts = [i * batches // count for i in range(count + 1)]
    return [Span(i, count, min(units, cuts[i] * block), min(units, cuts[i + 1] * block)) for i in range(count)]


def part_stage(stage: str) -> str:
    """Where a stage's parts are stored: `<stage>.part`."""
    return f"{stage}.part"


def part_key(key: str, span: Span) -> str:
    """A part's content key: the stage's key and the shard's span of units."""
    return sha256_json(["part", key, span.start, span.stop])


def shard_plan(stage: Stage, ctx: StageContext, inputs: StageInputs) -> tuple[list[int], list[Span]]:
    """(the stage's units in batch order, the spans of its `ctx.shards` shards); one span: no parts."""
    why = stage.shards.whole(inputs) if ctx.shards > 1 else None
    if why and (stage.name, ctx.key) not in _told_whole:  # the runners plan a stage more than once: say it once
        _told_whole.add((stage.name, ctx.key))
        log.warning("%s runs as one part, not %d shards: %s", stage.name, ctx.shards, why)
    if ctx.shards == 1 or why:
        return [], [Span(0, 1, 0, 0)]  # the units are not even read: the stage runs as one part of every row
    order = stage.shards.units(ctx, inputs)
    return order, spans(len(order), stage.shards.block(inputs), ctx.shards)


def input_rows(field: str, table: str) -> Callable[[StageContext, Any], list[int]]:
    """The units of a stage whose batches take the rows of its input artifact `field`'s table `table` in order
    (rollout and evaluate: the prompts)."""

    def units(ctx: StageContext, inputs: Any) -> list[int]:
        return list(range(ctx.store.manifest(getattr(inputs, field))["tables"][table]["rows"]))

    return units


def units_of(order: list[int], span: Span) -> Units:
    return Units(order[span.start : span.stop], span.start)


def ensure_part(stage: Stage, ctx: StageContext, inputs: StageInputs, span: Span,
                order: list[int] | None = None) -> ArtifactRef:
    """Shard `span`'s part: the stored one if it exists, else computed and published."""
    name, key = part_stage(stage.name), part_key(ctx.key, span)
    if (ref := ctx.store.lookup(name, key)) is not None:
        return ref
    if order is None:
        order = stage.shards.units(ctx, inputs)
    units = units_of(order, span)
    if ctx.before_part is not None:
        ctx.before_part(span)
    tables = part_tables(stage, ctx, inputs, units)
    with ctx.writer(name, key) as w:
        for table_name, table in tables.items():
            write_or_declare(w, table_name, table)
        w.meta.update({"stage": stage.name, "stage_key": ctx.key, "shard": span.index, "shards": span.count,
                       "units": [span.start, span.stop]})
        return w.commit()


def part_tables(stage: Stage, ctx: StageContext, inputs: StageInputs, units: Units) -> dict[str, pa.Table]:
    """The part's rows of each output table (exactly the stage's `outputs`, in that order)."""
    tables = stage.shards.part(ctx, inputs, units)
    if tuple(tables) != stage.outputs:
        raise TypeError(f"stage {stage.name!r}: a part returned tables {tuple(tables)}, not {stage.outputs}")
    return tables


def write_or_declare(writer, name: str, table: pa.Table) -> None:
    """Write one table of an artifact; an empty one is declared (no part file), so every artifact with the same
    rows has the same files, whether it was merged from parts or not."""
    if table.num_rows:
        writer.write_table(name, table)
    else:
        writer.declare_table(name)


def compute_sharded(stage: Stage, ctx: StageContext, inputs: StageInputs) -> ArtifactRef:
    """A sharded stage's artifact: every part (stored, or computed here), then the merge. With one shard, the
    merge of one part computed in memory (no part artifact)."""
    order, plan = shard_plan(stage, ctx, inputs)
    if len(plan) == 1:
        units = Units(None, 0)
        return stage.compute(ctx, inputs, [Part(units, part_tables(stage, ctx, inputs, units))])
    parts = []
    for span in plan:
        ref = ensure_part(stage, ctx, inputs, span, order)
        parts.append(Part(units_of(order, span), {t: ctx.store.read_table(ref, t) for t in stage.outputs}))
    return stage.compute(ctx, inputs, parts)


def concat(parts: list[Part], table: str | None = None) -> pa.Table:
    """The parts' rows of `table` (default: the only one) one after the other, as one contiguous table (one chunk
    per column, as an unsharded stage builds it, so the Parquet bytes are the same)."""
    tables = [p.table if table is None else p.tables[table] for p in parts]
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables).combine_chunks()
