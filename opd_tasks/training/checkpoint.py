"""Checkpoints: the student's weights (`save_pretrained`, safetensors), the AdamW state (safetensors, no pickle) and
the trainer's counters and RNG state (JSON), as the update stage writes them into its artifact:
```
model/                       save_pretrained + tokenizer: loadable by AutoModelForCausalLM / vLLM; its version
                             stamps are the student's (`keep_source_version_stamps`), not the writing library's
state/optimizer.safetensors  AdamW moments and step counts
state/trainer.json           global step/epoch counters, optimizer param groups, RNG state (as a list)
```
A later update that starts from a checkpoint restores the optimizer and RNG state, so two chained updates equal
one uninterrupted update over the same data when the old log-probs are the sampler's (`update.old_logprobs:
sampler`); recomputed ones are each update's starting model's, which is the sampling policy in a run, where every
update trains on its own student's rollouts.

The format does not depend on how many processes trained (`update.world_size`): a multi-process update's rank 0
writes the whole model and the whole optimizer state (gathered from the ranks' shards) in this same layout, and
loading shards it again for any world size (opd_tasks/training/distributed.py).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from opd_tasks.config import UpdateConfig
from opd_tasks.errors import ArtifactError
from opd_tasks.models import CHECKPOINT_MODEL_DIR, CHECKPOINT_STATE_DIR, ModelSpec
from opd_tasks.provenance import VERSION_FIELD, VERSION_STAMPED

#: The AdamW state inside CHECKPOINT_STATE_DIR; `opd gc` may drop it from checkpoints that are no run's latest.
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass
class OptimizerState:
    """An optimizer's full (unsharded) state as a checkpoint holds it: tensors named `{param index}.{name}` (the
    index into the optimizer's parameters, in `model.parameters()` order) and the param groups."""

    tensors: dict[str, torch.Tensor]
    param_groups: list[dict]


def _is_dtensor(v) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(v, DTensor)


def full_optimizer_state(opt: torch.optim.Optimizer, keep: bool = True) -> OptimizerState | None:
    """`opt`'s state with every tensor whole on the CPU. Under FSDP2 (DTensor parameters) each sharded moment is
    gathered, a collective: every rank calls this; only a rank with `keep` holds the result (one moment at a time
    on the others), and the others get None."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if _is_dtensor(v):
                v = v.full_tensor()
            if keep:
                tensors[f"{idx}.{name}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    return OptimizerState(tensors, sd["param_groups"]) if keep else None


def _load_optimizer(opt: torch.optim.Optimizer, path, groups: list[dict], cfg: UpdateConfig) -> None:
    """Load the full state saved at `path` into `opt`; a moment of a sharded (DTensor, FSDP2) parameter is
    sharded like the parameter, so a checkpoint of any world size resumes on any other."""
    from safetensors.torch import load_file

    flat = load_file(str(path))
    state: dict[int, dict] = {}
    for k, v in flat.items():
        idx, name = k.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    params = [p for g in opt.param_groups for p in g["params"]]
    for idx, st in state.items():
        p = params[idx] if idx < len(params) else None
        if p is None or not _is_dtensor(p):
            continue
        from torch.distributed.tensor import distribute_tensor

        for name, v in st.items():
            if v.shape == p.shape and v.dim() > 0:
                st[name] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
    opt.load_state_dict({"state": state, "param_groups": groups})
    for g in opt.param_groups:  # the config of this update wins over the saved hyperparameters
        g["lr"], g["weight_decay"] = cfg.learning_rate, cfg.weight_decay


def save_tokenizer(tokenizer, source: Path, out: Path) -> None:
    """The tokenizer files transformers writes for `tokenizer`, each copied byte for byte from `source` (the
    student's directory) where it has one. `save_pretrained` alone would record how the tokenizer was loaded
    (e.g. `local_files_only` follows HF_HUB_OFFLINE), so the checkpoint's bytes, and every later cache key, would
    depend on the environment; the training never changes the tokenizer."""
    with tempfile.TemporaryDirectory() as tmp:
        for f in tokenizer.save_pretrained(tmp):
            name = Path(f).name
            shutil.copyfile(source / name if (source / name).is_file() else f, out / name)




def keep_source_version_stamps(model_dir: Path, source: Path) -> None:
    """Give each of VERSION_STAMPED in `model_dir` the `transformers_version` of the same file in `source` (the
    student the checkpoint was trained from), or none where that file has none.

    `save_pretrained` writes the installed version there, so identical weights saved under transformers 5.24 and
    5.25 would be different bytes, a different artifact sha256 and different cache keys for every later stage. The
    stamp is not a label only: transformers reads it back (e.g. a tokenizer loaded from a directory whose config
    predates 5.0 gets the old Mistral regex handling), and the checkpoint's tokenizer files are the student's own
    bytes (`save_tokenizer`), so the source's stamp is the true one for them. Which library versions wrote the
    checkpoint is in its manifest's provenance (opd_tasks/provenance.py). The file is re-serialised exactly as
    transformers writes it (sorted keys, indent 2, a final newline)."""
    for name in VERSION_STAMPED:
        path = model_dir / name
        if not path.is_file():
            continue
        config = json.loads(path.read_text(encoding="utf-8"))
        src = source / name
        stamp = json.loads(src.read_text(encoding="utf-8")).get(VERSION_FIELD) if src.is_file() else None
        if stamp is None:
            config.pop(VERSION_FIELD, None)
        else:
            config[VERSION_FIELD] = stamp
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_checkpoint(out: Path, model, tokenizer, tokenizer_source: Path,
                    opt: torch.optim.Optimizer | OptimizerState, trainer: dict, seed: int,
                    optimizer_state: str = "float32") -> None:
    """Write model/ (safetensors + the tokenizer of `tokenizer_source`) and state/ (optimizer, counters, RNG)
    under `out`. `opt`: the optimizer, or its state already gathered (`full_optimizer_state`: a sharded
    optimizer's rank 0 writes what every rank gathered). `optimizer_state` (`update.optimizer_state`): the dtype
    of the stored moments (the step counts stay float32); loading casts them back to the parameters' dtype."""
    from safetensors.torch import save_file

    mdir = out / CHECKPOINT_MODEL_DIR
    model.save_pretrained(mdir, safe_serialization=True)
    keep_source_version_stamps(mdir, Path(tokenizer_source))
    save_tokenizer(tokenizer, Path(tokenizer_source), mdir)
    sdir = out / CHECKPOINT_STATE_DIR
    sdir.mkdir()
    state = opt if isinstance(opt, OptimizerState) else full_optimizer_state(opt)
    dtype = getattr(torch, optimizer_state)
    save_file({k: v.to(dtype) if v.dim() > 0 and v.is_floating_point() else v for k, v in state.tensors.items()},
              str(sdir / OPTIMIZER_FILE))
    (sdir / "trainer.json").write_text(json.dumps(
        {**trainer, "optimizer": {"param_groups": state.param_groups}, "rng_cpu": torch.get_rng_state().tolist(),
         "seed": seed}))


def fresh_training_state(sdir: Path, rng: torch.Tensor, seed: int) -> None:
    """Write the state of a trainer that never stepped into `sdir` (an update skipped for want of signal, from a model
    that is no checkpoint): no optimizer moments (`optimizer: null` in trainer.json), step counters 0, and `rng`."""
    from safetensors.torch import save_file

    save_file({}, str(sdir / OPTIMIZER_FILE))
    (sdir / "trainer.json").write_text(json.dumps(
        {"global_step": 0, "global_epoch": 0, "optimizer": None, "rng_cpu": rng.tolist(), "seed": seed}))


def load_training_state(student: ModelSpec, opt: torch.optim.Optimizer, cfg: UpdateConfig) -> dict:
    """Restore optimizer and RNG state from a checkpoint artifact; returns the step/epoch counters."""
    if student.checkpoint is None:
        return {"global_step": 0, "global_epoch": 0}
    sdir = student.dir.parent / CHECKPOINT_STATE_DIR
    if not (sdir / OPTIMIZER_FILE).is_file():
        raise ArtifactError(f"checkpoint {student.checkpoint.short()}: its optimizer state {sdir / OPTIMIZER_FILE} "
                            "is gone (opd gc drops it from checkpoints that are no run's latest), so the update after "
                            "it cannot continue it exactly: recompute the checkpoints with `opd run --refresh update`")
    saved = json.loads((sdir / "trainer.json").read_text())
    if saved["optimizer"] is not None:  # None: a never-stepped trainer (`fresh_training_state`): a new optimizer
        _load_optimizer(opt, sdir / OPTIMIZER_FILE, saved["optimizer"]["param_groups"], cfg)
    torch.set_rng_state(torch.tensor(saved["rng_cpu"], dtype=torch.uint8))
    return {"global_step": saved["global_step"], "global_epoch": saved["global_epoch"]}
