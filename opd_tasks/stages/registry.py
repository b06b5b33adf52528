"""The stage registry: each stage is declared once, with `@stage(...)` on its compute function.

A stage is a record (`Stage`): its name, code version, the type of its inputs, the tables it writes, whether it
needs a GPU (then it may run as its own deployment and carries the concurrency tag), and its compute function.
Everything else is derived from that record:

- the cache key (`Stage.key`): sha256 of (name, version, every input artifact's and model's content hash, the
  config the inputs carry, the seed), computed from the inputs' fields (`StageInputs`); the store and Prefect's
  cache policy both use this one key;
- the cache prologue (`execute`): return the artifact under the key if the store has it, else compute and
  publish; a stage's compute function only computes;
- the stage list of the CLI (`--refresh`, `opd deploy-stages`), the fault config, the deployments and
  docs/stages.md;
- for a row-parallel stage registered with `shards=Shards(...)`, how its work splits into shards
  (opd_tasks/stages/sharding.py); its registered function then merges the shards' parts.

Inputs are a pydantic model per stage (`StageInputs`): what the stage reads and what its key is made of, and
nothing that is not (no device, no progress bar, no run name). They round-trip through JSON, which is how the
deployment runner sends them to a stage's own flow run.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from opd_tasks.errors import ConfigError
from opd_tasks.models import ModelSpec
from opd_tasks.provenance import provenance
from opd_tasks.stages.sharding import Shards, Span, compute_sharded, ensure_part
from storage.errors import DiskFullError
from storage.keys import cache_key
from storage.refs import ArtifactRef
from storage.store import ArtifactStore


class StageInputs(BaseModel):
    """A stage's inputs. Its cache key is derived from the fields (override `key_parts` only to leave something
    out or add a content hash, and say why):

    - an `ArtifactRef` (or None) is an input artifact: its sha256;
    - a `ModelSpec` is an input model: the hash of its files (or of its checkpoint artifact);
    - `seed` is the seed;
    - any other field (a config section, a flag) is part of the config slice, as JSON.
    Fields named in `unkeyed` are read but not keyed (each with its reason in the stage module).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    unkeyed: ClassVar[frozenset[str]] = frozenset()

    def key_parts(self) -> tuple[dict[str, ArtifactRef | str | None], dict[str, Any], int | None]:
        """(input artifacts and models by content hash, config slice, seed)."""
        artifacts: dict[str, ArtifactRef | str | None] = {}
        config: dict[str, Any] = {}
        seed = None
        for name in type(self).model_fields:
            role, value = field_role(type(self), name), getattr(self, name)
            if role == "seed":
                seed = value
            elif role == "input":
                artifacts[name] = value.sha256 if isinstance(value, ModelSpec) else value
            elif role == "config":
                config[name] = key_slice(value) if isinstance(value, BaseModel) else value
        return artifacts, config, seed


def field_role(cls: type[StageInputs], name: str) -> str:
    """How field `name` enters the key: `unkeyed`, `seed`, `input` (an ArtifactRef or ModelSpec, by content hash;
    None when absent) or `config` (by value)."""
    if name in cls.unkeyed:
        return "unkeyed"
    if name == "seed":
        return "seed"
    ann = cls.model_fields[name].annotation
    return "input" if {ArtifactRef, ModelSpec} & {ann, *getattr(ann, "__args__", ())} else "config"


def key_slice(section: BaseModel) -> Any:
    """A config section as it enters a key: its own `key_slice()` if it has one (backend sections), else JSON."""
    own = getattr(section, "key_slice", None)
    return own() if callable(own) else section.model_dump(mode="json")


@dataclass
class StageContext:
    """What a compute function gets besides its inputs: where to write, under which key, on which device."""

    store: ArtifactStore
    stage: str
    key: str
    device: str = "auto"
    #: Progress bars: by default only when stderr is a terminal; in a log file each stage is the runner's one line.
    progress: bool = field(default_factory=lambda: sys.stderr.isatty())
    #: Shards of a sharded stage (`orchestration.shards`); in no key: the artifact is the same for any number.
    shards: int = 1
    #: Called with a shard's span just before its part is computed (fault injection; opd_tasks/pipeline.py).
    before_part: Callable[[Span], None] | None = None

    def writer(self, stage: str | None = None, key: str | None = None):
        """A writer of this stage's artifact under its key (storage/store.py, `ArtifactWriter`), or of `stage`/`key`
        (a shard's part), its provenance filled in (opd_tasks/provenance.py)."""
        w = self.store.writer(stage or self.stage, key or self.key)
        w.provenance.update(provenance(self.device))
        return w

    def put_table(self, table_name: str, table, meta: dict | None = None) -> ArtifactRef:
        """Publish a one-table artifact under this stage's key."""
        return self.store.put_table(self.stage, self.key, table_name, table, meta=meta,
                                    provenance=provenance(self.device))


@dataclass(frozen=True)
class Stage:
    """One registered stage (see the module docstring)."""

    name: str
    version: int
    inputs: type[StageInputs]
    outputs: tuple[str, ...]  # the tables it writes; `checkpoint` for a model directory
    gpu: bool
    compute: Callable[..., ArtifactRef]  # (ctx, inputs), or for a sharded stage (ctx, inputs, parts): the merge
    summary: str
    shards: Shards | None = None  # how a row-parallel stage splits into shards (opd_tasks/stages/sharding.py)

    def key(self, inputs: StageInputs) -> str:
        """The content key of this stage on `inputs` (64 hex digits)."""
        if not isinstance(inputs, self.inputs):
            raise ConfigError(f"stage {self.name!r} takes {self.inputs.__name__}, got {type(inputs).__name__}")
        artifacts, config, seed = inputs.key_parts()
        return cache_key(self.name, self.version, artifacts, config, seed)

    def __call__(self, store: ArtifactStore, inputs: StageInputs, *, device: str = "auto",
                 progress: bool | None = None) -> ArtifactRef:
        """Run the stage as a plain function: the artifact under its key if it exists, else computed. `progress`:
        bars (default: when stderr is a terminal)."""
        ctx = StageContext(store, self.name, self.key(inputs), device)
        ctx.progress = ctx.progress if progress is None else progress
        return execute(self, ctx, inputs)[0]


def execute(stage: Stage, ctx: StageContext, inputs: StageInputs,
            before_compute: Callable[[], None] | None = None) -> tuple[ArtifactRef, bool]:
    """The cache prologue every stage shares: (the stored artifact under `ctx.key`, False) if there is one, else
    `before_compute()` (fault injection) and (the computed artifact, True)."""
    if (ref := ctx.store.lookup(stage.name, ctx.key)) is not None:
        return ref, False
    if before_compute is not None:
        before_compute()
    return compute(stage, ctx, inputs), True


def compute(stage: Stage, ctx: StageContext, inputs: StageInputs) -> ArtifactRef:
    """Run the stage's compute function (a sharded stage: its parts, then the merge); its artifact must be
    published under the stage's name and key. Its input models are first found in this store
    (`ModelSpec.in_store`: a checkpoint made in another pod is pulled)."""
    inputs = models_in_store(ctx, inputs)
    with disk_full_named(stage.name):
        ref = compute_sharded(stage, ctx, inputs) if stage.shards is not None else stage.compute(ctx, inputs)
    if ref.key != ctx.key or ref.stage != stage.name:
        raise ConfigError(f"stage {stage.name!r} published {ref.stage}/{ref.key}, not under its key {ctx.key}")
    return ref


def compute_part(stage: Stage, ctx: StageContext, inputs: StageInputs, span: Span) -> ArtifactRef:
    """One shard's part of a sharded stage, stored or computed (a shard's own task or flow run), with its input
    models found in this store as `compute` finds them."""
    inputs = models_in_store(ctx, inputs)
    with disk_full_named(stage.name):
        return ensure_part(stage, ctx, inputs, span)


def models_in_store(ctx: StageContext, inputs: StageInputs) -> StageInputs:
    """`inputs` with each input model found in the context's store (`ModelSpec.in_store`)."""
    return inputs.model_copy(update={name: value.in_store(ctx.store) for name, value in inputs
                                     if isinstance(value, ModelSpec)})


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


_REGISTRY: dict[str, Stage] = {}


def stage(name: str, *, version: int, inputs: type[StageInputs], outputs: tuple[str, ...],
          gpu: bool = True, shards: Shards | None = None) -> Callable[[Callable[..., ArtifactRef]], Stage]:
    """Register the decorated compute function `fn(ctx, inputs) -> ArtifactRef` as stage `name`; with `shards`,
    the decorated function is the merge, `fn(ctx, inputs, parts) -> ArtifactRef` (opd_tasks/stages/sharding.py).

    Bump `version` whenever the code changes what the stage writes: the new version gets new cache keys."""

    def register(fn: Callable[..., ArtifactRef]) -> Stage:
        if name in _REGISTRY:
            raise ConfigError(f"stage {name!r} is registered twice")
        doc = inspect.getdoc(fn) or ""
        _REGISTRY[name] = record = Stage(name, version, inputs, outputs, gpu, fn, doc.split("\n\n")[0], shards)
        return record

    return register


def registered() -> dict[str, Stage]:
    """Every registered stage by name, in registration (= pipeline) order."""
    return dict(_REGISTRY)
