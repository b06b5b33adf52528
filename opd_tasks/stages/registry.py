"""What a stage is, and the one function that runs one: `run_stage(stage, ctx, inputs, span=None)`.

A stage is a record (`Stage`, listed once in the stage table, opd_tasks/stages/__init__.py): its name, code
version, inputs record (opd_tasks/stages/inputs.py), the tables it writes, whether it needs a GPU, and its compute
function, named by dotted path and imported on first use. Two kinds:

- a **whole** stage (prompts, gates, update): `fn(ctx, inputs) -> Output`, the tables and meta of its artifact;
  free-form files (a checkpoint's model/ and state/) go into `ctx.files`.
- a **row-parallel** stage (rollout, score, analyze, evaluate; `rows=Rows(...)`): `fn(ctx, inputs, rows) ->
  {table: rows}`, the output rows of the given input rows (None: all of them). Its work can split into parts
  (`orchestration.shards`), each a run of whole batches (`Rows.block`), so every batch, and the seed of every
  batch, is the same for any number of parts. Two optional hooks hold what needs the whole batch:
  `prepare(ctx, inputs)` once before the parts (the analysis' high-loss cut: a JSON dict the parts read as
  `ctx.prepared`, which enters the part key) and `finish(ctx, inputs, tables) -> Output` once after them (every
  stage's summary meta; the analysis' delta, regimes, weights and bridges).

`run_stage` computes and publishes; it never looks the store up (the stage runner did, once: opd_tasks/
pipeline.py). With `span`, it computes that part's rows and publishes them as a part artifact,
`<stage>.part/<part key>`; without, a row-parallel stage's tables are its parts' (`ctx.spans`, each read back,
or computed here if missing) put back in input-row order (`in_row_order`: by the `Rows.key` columns every output
table carries), or all rows computed in memory when it has no parts; then `finish`, then the artifact. So with
the `hf` backend the artifact's bytes do not depend on the number of parts nor on which process computed which
(tests/unit/test_sharding.py), as long as the processes run torch with the same number of CPU threads. Parts
are in no run's lineage: `opd gc` removes them.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opd_tasks.errors import ConfigError, DataError
from opd_tasks.models import ModelSpec
from opd_tasks.provenance import provenance
from opd_tasks.stages.inputs import StageInputs
from storage.errors import DiskFullError
from storage.hashing import sha256_json
from storage.keys import cache_key
from storage.refs import ArtifactRef
from storage.store import ArtifactStore

log = logging.getLogger(__name__)


def resolve(path: str | Callable) -> Callable:
    """The function at dotted path `module:name`, imported on first use (a function is itself: a stage made in a
    test or an example names its functions directly)."""
    if callable(path):
        return path
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Rows:
    """How a row-parallel stage's work splits into parts (module docstring)."""

    field: str  # the inputs field of the artifact whose rows the stage computes (prompts, rollouts)
    table: str  # that artifact's table
    key: tuple[str, ...]  # the columns that name an input row, in that table and in every output table
    block: str  # fn(inputs) -> input rows per batch: parts start on multiples of it
    order: str | None = None  # fn(ctx, inputs) -> the input rows in batch order; None: every row, in row order
    whole: str | None = None  # fn(inputs) -> why these inputs cannot split (then one part, with a warning)


@dataclass(frozen=True)
class Stage:
    """One stage (module docstring)."""

    name: str
    version: int
    inputs: type[StageInputs]
    outputs: tuple[str, ...]  # the tables it writes; `checkpoint` for a model directory
    compute: str | Callable  # module:function
    summary: str
    gpu: bool = True
    rows: Rows | None = None
    prepare: str | None = None  # fn(ctx, inputs) -> JSON dict, once before the parts
    finish: str | None = None  # fn(ctx, inputs, tables) -> Output, once after them

    def fn(self, hook: str | None = None) -> Callable:
        """The stage's compute function, or its hook `hook` (`prepare`, `finish`, `block`, `order`, `whole`)."""
        if hook is None:
            return resolve(self.compute)
        return resolve(getattr(self.rows if hook in ("block", "order", "whole") else self, hook))

    def key(self, inputs: StageInputs) -> str:
        """The content key of this stage on `inputs` (64 hex digits)."""
        if not isinstance(inputs, self.inputs):
            raise ConfigError(f"stage {self.name!r} takes {self.inputs.__name__}, got {type(inputs).__name__}")
        artifacts, config, seed = inputs.key_parts()
        return cache_key(self.name, self.version, artifacts, config, seed)

    def __call__(self, store: ArtifactStore, inputs: StageInputs, *, device: str = "auto",
                 progress: bool | None = None) -> ArtifactRef:
        """The stage as a plain function (tests, benchmarks): the artifact under its key if the store has it, else
        computed whole. `progress`: bars (default: when stderr is a terminal)."""
        key = self.key(inputs)
        if (ref := store.lookup(self.name, key)) is not None:
            return ref
        ctx = StageContext.of(store, self.name, key, device=device,
                              progress=sys.stderr.isatty() if progress is None else progress)
        return run_stage(self, plan_call(self, ctx, inputs, shards=1), inputs)


@dataclass(frozen=True)
class Output:
    """What a whole stage's compute (or a row-parallel stage's `finish`) returns: its tables and its meta."""

    tables: dict[str, pa.Table] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Span:
    """Part `index` of `count`: positions [start, stop) of the stage's input rows in batch order."""

    index: int
    count: int
    start: int
    stop: int


@dataclass(frozen=True)
class StageContext:
    """Where and how a stage call computes: its store (by root and remote, so the context crosses to a process pool
    or, as JSON, to a deployment's flow run), its key, device and progress bars, the run and iteration it is for
    (names of task runs, fault drills), and, set by `plan` on a miss, its parts and `prepare`'s result."""

    root: str
    remote: str | None
    stage: str
    key: str
    device: str = "auto"
    progress: bool = False
    run: str = "adhoc"
    iteration: int = 0
    label: str = ""  # the call's name in the lineage (the stage's, or eval_prompts / baseline); "": the stage's
    spans: tuple[Span, ...] = ()  # the parts of this call; empty: the stage is computed whole, in memory
    prepared: dict | None = None  # `prepare`'s result (row-parallel stages that have one)
    files: str | None = None  # a whole stage's free-form files go here (set by run_stage: the writer's temp dir)

    @classmethod
    def of(cls, store: ArtifactStore, stage: str, key: str, **kw) -> StageContext:
        """A context on `store` itself (its `published` list sees what the call publishes), in this process."""
        ctx = cls(str(store.root), store.remote_uri, stage, key, **kw)
        ctx.__dict__["store"] = store  # what `store` would open: this one, already open
        return ctx

    @cached_property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root, self.remote)

    def with_(self, **changes) -> StageContext:
        """This context with `changes`, on the same store object."""
        new = replace(self, **changes)
        if "store" in self.__dict__:
            new.__dict__["store"] = self.__dict__["store"]
        return new

    def __getstate__(self) -> dict:  # a process pool gets the fields, and opens its own store
        return {k: v for k, v in self.__dict__.items() if k != "store"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def to_json(self) -> dict:
        """The context as JSON (a deployment's flow-run parameter)."""
        return {**self.__getstate__(), "spans": [s.__dict__ for s in self.spans]}

    @classmethod
    def from_json(cls, data: dict) -> StageContext:
        return cls(**{**data, "spans": tuple(Span(**s) for s in data.get("spans") or ())})

    def writer(self, stage: str | None = None, key: str | None = None):
        """A writer of this stage's artifact under its key, or of `stage`/`key` (a part), with its provenance."""
        w = self.store.writer(stage or self.stage, key or self.key)
        w.provenance.update(provenance(self.device))
        return w


# ----------------------------------------------------------------------------------------- parts


def spans(units: int, block: int, shards: int) -> list[Span]:
    """`shards` contiguous spans of `units` rows, each a whole number of `block`-row batches (the last batch may
    be short), as even as whole batches allow; fewer spans when there are fewer batches than shards."""
    batches = max(1, -(-units // block))
    count = max(1, min(shards, batches))
    cuts = [i * batches // count for i in range(count + 1)]
    return [Span(i, count, min(units, cuts[i] * block), min(units, cuts[i + 1] * block)) for i in range(count)]


def part_stage(stage: str) -> str:
    """Where a stage's parts are stored: `<stage>.part`."""
    return f"{stage}.part"


def part_key(ctx: StageContext, span: Span) -> str:
    """A part's content key: the stage's key, the span of input rows and `prepare`'s result."""
    parts = ["part", ctx.key, span.start, span.stop]
    return sha256_json(parts if ctx.prepared is None else [*parts, ctx.prepared])


def row_order(stage: Stage, ctx: StageContext, inputs: StageInputs) -> list[int]:
    """The stage's input rows in batch order."""
    if stage.rows.order is not None:
        return stage.fn("order")(ctx, inputs)
    return list(range(ctx.store.manifest(getattr(inputs, stage.rows.field))["tables"][stage.rows.table]["rows"]))


def plan_call(stage: Stage, ctx: StageContext, inputs: StageInputs, shards: int) -> StageContext:
    """The context of one call on a miss: `prepare`'s result and the spans of its parts (none with one shard, or
    when the inputs cannot split: `Rows.whole`, logged)."""
    if stage.rows is None:
        return ctx
    prepared = stage.fn("prepare")(ctx, inputs) if stage.prepare is not None else None
    why = stage.fn("whole")(inputs) if stage.rows.whole is not None and shards > 1 else None
    if why:
        log.warning("%s runs as one part, not %d shards: %s", stage.name, shards, why)
    if shards == 1 or why:
        return ctx.with_(prepared=prepared, spans=())
    parts = spans(len(row_order(stage, ctx, inputs)), stage.fn("block")(inputs), shards)
    return ctx.with_(prepared=prepared, spans=tuple(parts) if len(parts) > 1 else ())


# ----------------------------------------------------------------------------------------- run_stage


def run_stage(stage: Stage, ctx: StageContext, inputs: StageInputs, span: Span | None = None) -> ArtifactRef:
    """Compute `stage` on `inputs` and publish it under `ctx.key`, or with `span` that part's rows under its part
    key (module docstring). No lookup. Input models are first found in this store (`ModelSpec.in_store`: a
    checkpoint made in another pod is pulled)."""
    inputs = inputs.model_copy(update={name: value.in_store(ctx.store) for name, value in inputs
                                       if isinstance(value, ModelSpec)})
    with disk_full_named(stage.name):
        if span is not None:
            return _compute_part(stage, ctx, inputs, span)
        if stage.rows is None:
            with ctx.writer() as w:
                return _commit(w, stage, stage.fn()(ctx.with_(files=str(w.path)), inputs))
        if ctx.spans:
            tables = in_row_order(stage, ctx, inputs, [_part_tables(stage, ctx, inputs, s) for s in ctx.spans])
        else:
            tables = _checked(stage, stage.fn()(ctx, inputs, None))
        out = stage.fn("finish")(ctx, inputs, tables)
        with ctx.writer() as w:
            return _commit(w, stage, out)


def _checked(stage: Stage, tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    if tuple(tables) != stage.outputs:
        raise TypeError(f"stage {stage.name!r}: its compute returned tables {tuple(tables)}, not {stage.outputs}")
    return tables


def _commit(w, stage: Stage, out: Output) -> ArtifactRef:
    """Write `out` (every table, empty ones declared, so an artifact with the same rows has the same files whether
    it was merged from parts or not) and its meta; publish."""
    for name, table in out.tables.items():
        if table.num_rows:
            w.write_table(name, table)
        else:
            w.declare_table(name)
    w.meta.update(out.meta)
    return w.commit()


def _compute_part(stage: Stage, ctx: StageContext, inputs: StageInputs, span: Span) -> ArtifactRef:
    rows = row_order(stage, ctx, inputs)[span.start : span.stop]
    tables = _checked(stage, stage.fn()(ctx, inputs, rows))
    with ctx.writer(part_stage(stage.name), part_key(ctx, span)) as w:
        return _commit(w, stage, Output(tables, {"stage": stage.name, "stage_key": ctx.key, "shard": span.index,
                                                 "shards": span.count, "units": [span.start, span.stop]}))


def _part_tables(stage: Stage, ctx: StageContext, inputs: StageInputs, span: Span) -> dict[str, pa.Table]:
    """Part `span`'s tables: the stored part, or computed here when it is missing (a part removed by `opd gc`)."""
    ref = ctx.store.lookup(part_stage(stage.name), part_key(ctx, span))
    if ref is None:
        ref = _compute_part(stage, ctx, inputs, span)
    return {t: ctx.store.read_table(ref, t) for t in stage.outputs}


def row_names(table: pa.Table, key: tuple[str, ...]) -> pa.ChunkedArray | pa.Array:
    """One value per row naming its input row: the key column, or the key columns joined as strings."""
    if len(key) == 1:
        return table.column(key[0])
    return pc.binary_join_element_wise(*(pc.cast(table.column(c), pa.string()) for c in key), "\x1f")


def in_row_order(stage: Stage, ctx: StageContext, inputs: StageInputs,
                 parts: list[dict[str, pa.Table]]) -> dict[str, pa.Table]:
    """Each output table of `parts` as one contiguous table (one chunk per column, as a stage computed whole builds
    it, so the Parquet bytes are the same) in input-row order: a stable sort of the parts' rows by the input row
    they name (`Rows.key`); within a part a stage writes its rows in input-row order."""
    rows = stage.rows
    names = row_names(ctx.store.read_table(getattr(inputs, rows.field), rows.table, columns=list(rows.key)),
                      rows.key)
    names = names.combine_chunks() if isinstance(names, pa.ChunkedArray) else names
    if pc.count_distinct(names).as_py() != len(names):
        raise DataError(f"stage {stage.name}: the {rows.table} rows are not uniquely named by {list(rows.key)}")
    out = {}
    for t in stage.outputs:
        table = pa.concat_tables([p[t] for p in parts])
        at = pc.index_in(row_names(table, rows.key), value_set=names)
        if table.num_rows and at.null_count:
            raise DataError(f"stage {stage.name}: a part's {t} row names no {rows.table} row")
        order = np.argsort(at.to_numpy(zero_copy_only=False), kind="stable")
        out[t] = table.take(pa.array(order, pa.int64())).combine_chunks()
    return out


@contextmanager
def disk_full_named(stage: str) -> Iterator[None]:
    """A full disk while the body writes (e.g. a checkpoint's save_pretrained into the writer's temp dir) is a
    DiskFullError naming the stage."""
    try:
        yield
    except Exception as e:
        if full := DiskFullError.wrap(e, f"stage {stage!r} was writing its artifact"):
            raise full from e
        raise


def files_dir(ctx: StageContext) -> Path:
    """A whole stage's directory for the free-form files of its artifact."""
    if ctx.files is None:
        raise ConfigError(f"stage {ctx.stage!r}: no files directory outside run_stage")
    return Path(ctx.files)
