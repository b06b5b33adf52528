"""The multi-process update (`update.world_size` > 1): torch.distributed ranks, the student sharded with FSDP2.

The update stage (the parent) launches `python -m torch.distributed.run --standalone --nproc_per_node=N -m
opd_tasks.training.distributed JOB.json` as a child process and waits for it. JOB.json (no pickle) holds the
stage's inputs (`UpdateInputs` as JSON), the store's root and remote, the device, the progress flag, the writer's
temp dir and a scratch dir. Each rank:

1. joins the process group (gloo on the CPU, NCCL on CUDA with one GPU per rank, `LOCAL_RANK`), seeds the RNG as
   the one-process update does (every rank the same);
2. reads the scored sequences from the store itself, loads the whole student and recomputes the old log-probs of
   every sequence on it (every rank all of them, before sharding: the same values as on one rank);
3. shards the student with `fully_shard`, each decoder layer then the root, on a 1-D device mesh of the N ranks;
   gradients are summed over the ranks, not averaged (`set_gradient_divide_factor(1)`), since every loss is
   already divided by the token count of the whole step;
4. runs the shared training loop (opd_tasks/training/loop.py: rank r takes micro-batches r, r+N, ... of each
   step; the logged figures are summed over the ranks; clipping uses the global norm of the DTensor gradients);
5. gathers the whole model (`get_model_state_dict`, full and offloaded to the CPU) and the whole optimizer state;
   rank 0 writes the checkpoint into the writer's temp dir in the one-process format, and the `updates` rows and
   the `old_logprobs` table into the scratch dir.

The parent then writes the tables and the meta and commits the artifact, as the one-process update does. A rank
that fails writes its error to the scratch dir; torchrun stops the others; the parent raises it (as its own class
when it is one of the package's errors, e.g. the `TrainingError` of a NaN loss; else a retryable `TransientError`)
with the world size and the tail of the ranks' output, and nothing is published. Stopping the stage (a cancel, a
timeout) stops torchrun's whole process group, its ranks included.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from opd_tasks.errors import ConfigError, OpdError, TransientError

#: A line rank 0 prints to stdout for the parent's progress bar.
PROGRESS = "OPD-UPDATE-PROGRESS "
_TAIL_LINES = 60


def check_world_size(dev: torch.device, world_size: int) -> None:
    """ConfigError before any work when a CUDA update asks for more ranks than there are GPUs."""
    if dev.type == "cuda" and torch.cuda.device_count() < world_size:
        raise ConfigError(f"update.world_size is {world_size} but torch sees {torch.cuda.device_count()} CUDA "
                          f"device(s); a CUDA update runs one rank per GPU: lower update.world_size")


def launch(ctx, x, out: Path) -> tuple[list[dict], pa.Table, int]:
    """Train in `x.update.world_size` torchrun ranks; rank 0 writes the checkpoint under `out`. Returns the
    `updates` rows, the `old_logprobs` table and the number of sequences."""
    n = x.update.world_size
    if x.update.grad_accumulation < n:
        logging.getLogger(__name__).warning(
            "update.world_size is %d but update.grad_accumulation is %d: the ranks share each step's %d "
            "micro-batch(es), so %d rank(s) only hold their shard of the model and optimizer and compute nothing; set "
            "update.grad_accumulation to a multiple of %d (the same step: micro_batch_size x grad_accumulation "
            "sequences) for every rank to work", n, x.update.grad_accumulation, x.update.grad_accumulation,
            n - x.update.grad_accumulation, n)
    with tempfile.TemporaryDirectory(prefix="opd-update-") as tmp:
        scratch = Path(tmp)
        job = {"inputs": x.model_dump(mode="json"), "root": str(ctx.store.root), "remote": ctx.store.remote_uri,
               "device": ctx.device, "progress": bool(ctx.progress), "out": str(out), "scratch": str(scratch)}
        (scratch / "job.json").write_text(json.dumps(job))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "--max-restarts=0", "-m", "opd_tasks.training.distributed", str(scratch / "job.json")]
        root = str(Path(__file__).resolve().parents[2])  # the ranks import this package as the stage does
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        rc, tail = _run(cmd, env, ctx.progress)
        if rc != 0:
            raise _rank_error(scratch, n, rc, tail)
        result = json.loads((scratch / "result.json").read_text())
        return result["rows"], pq.read_table(scratch / "old_logprobs.parquet"), result["sequences"]


def _run(cmd: list[str], env: dict, progress: bool) -> tuple[int, str]:
    """Run torchrun; rank 0's progress lines drive a bar here; every other line is kept, the last ones returned."""
    from opd_tasks.progress import Bar

    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    bar = None
    # its own process group: stopping the update (a cancel, a timeout, Ctrl-C) stops torchrun and every rank
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith(PROGRESS):
                tail.append(line.rstrip("\n"))
                continue
            msg = json.loads(line[len(PROGRESS):])
            if "total" in msg:
                bar = Bar(msg["total"], "update", "steps", progress)
            elif bar is not None:
                bar.update(1)
                bar.note(**msg)
        rc = proc.wait()
    except BaseException:
        _stop_group(proc)
        raise
    finally:
        if bar is not None:
            bar.close()
    return rc, "\n".join(tail)


def _stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to torchrun's process group (torchrun passes it to its ranks), SIGKILL after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def _rank_error(scratch: Path, n: int, rc: int, tail: str) -> OpdError:
    """The error of the rank that failed first: one of the package's errors (raised as its class: a TrainingError
    for a NaN, a DiskFullError, ...) before any other (a rank whose peer died fails in its next collective, a
    moment later: "Connection closed by peer"), else the earliest. Any other failure (CUDA out of memory, a
    collective's error, a rank killed by a signal) is a TransientError, retried as the one-process update's
    unknown errors are (flows/executors.py, `_should_retry`)."""
    import storage.errors as errors

    def package_error(report: dict) -> type[OpdError] | None:
        cls = getattr(errors, report["type"], None)
        return cls if isinstance(cls, type) and issubclass(cls, OpdError) else None

    reports = [json.loads(f.read_text()) for f in scratch.glob("error-rank*.json")]
    ours = [r for r in reports if package_error(r) is not None]
    first = min(ours or reports, key=lambda r: r["time"], default=None)
    what = (f"rank {first['rank']} failed: {first['type']}: {first['message']}" if first
            else f"torchrun exited with status {rc} and no rank reported an error")
    cls = package_error(first) if ours else TransientError
    return cls(f"update with update.world_size={n}: {what}; nothing was published\n"
               f"--- last lines of the ranks' output ---\n{tail}")


# -- in each rank -------------------------------------------------------------------------------------------------


class _ProgressLines:
    """Rank 0's bar: one JSON line per step on stdout, which the parent turns into its bar."""

    def __init__(self, total: int):
        print(PROGRESS + json.dumps({"total": total}), flush=True)

    def update(self, n: int = 1) -> None:
        pass

    def note(self, **figures: str) -> None:
        print(PROGRESS + json.dumps(figures), flush=True)

    def close(self) -> None:
        pass


def shard(model, mesh) -> None:
    """FSDP2: each decoder layer its own unit, then the root (embeddings, final norm, output head, tied or not).
    The ranks' gradients are summed, not averaged. The loss runs as a forward method of the root
    (`register_fsdp_forward_method`), since it calls the decoder and the output head directly."""
    from torch.distributed.fsdp import fully_shard

    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__}: its decoder has no `layers` to shard; update.world_size > 1 "
                          "needs a decoder-layer model (Llama, Qwen, Mistral, Gemma, ...)")
    units = [*layers, model]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for u in units:
        u.set_gradient_divide_factor(1.0)
        u.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no AVG / PREMUL_SUM


def _train_rank(job: dict, rank: int, world: int, dev: torch.device) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import register_fsdp_forward_method

    from opd_tasks.backends.hf import load_causal_lm
    from opd_tasks.backends.loaded import LOADED
    from opd_tasks.progress import Bar
    from opd_tasks.stages.inputs import UpdateInputs
    from opd_tasks.training.checkpoint import full_optimizer_state, load_training_state, save_checkpoint
    from opd_tasks.training.loop import Ranks, load_sequences, recompute_old_logprobs, train_steps
    from opd_tasks.training.objective import micro_batch_loss
    from opd_tasks.training.sequences import old_logprobs_table
    from storage.store import ArtifactStore

    x = UpdateInputs.model_validate(job["inputs"])
    cfg, student = x.update, x.student
    store = ArtifactStore(job["root"], remote=job["remote"])
    seqs, bridge = load_sequences(store, x)
    tok = LOADED.tokenizer(student)
    model = load_causal_lm(student.path, dev, "float32", student.trust_remote_code)
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cfg.bf16 and dev.type == "cuda")
    recompute_old_logprobs(model, seqs, tok.pad_token_id, cfg, autocast)
    model.train()
    t_model = LOADED.model(x.teacher, dev) if cfg.loss == "full_rkl" else None
    shard(model, init_device_mesh(dev.type, (world,)))
    model.opd_micro_batch_loss = lambda batch: micro_batch_loss(model, batch, cfg, bridge, tok.pad_token_id, dev,
                                                                t_model, x.advantage)
    register_fsdp_forward_method(model, "opd_micro_batch_loss")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    trainer = load_training_state(student, opt, cfg)

    per_step = cfg.micro_batch_size * cfg.grad_accumulation
    n_steps = cfg.epochs * ((len(seqs) + per_step - 1) // per_step)
    bar = _ProgressLines(n_steps) if rank == 0 and job["progress"] else Bar(n_steps, "update", "steps", False)
    rows = train_steps(model.opd_micro_batch_loss, params, opt, seqs, trainer, cfg, x.seed, bridge is not None,
                       student.sha256, autocast, bar, Ranks(rank, world, dev))

    model.eval()
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    opt_state = full_optimizer_state(opt, keep=rank == 0)  # a collective: every rank; only rank 0 keeps it
    if rank == 0:
        with torch.random.fork_rng(devices=[]):  # the saved RNG state is the training's, as on one rank
            whole = load_causal_lm(student.path, torch.device("cpu"), "float32", student.trust_remote_code)
        whole.load_state_dict(weights, strict=True)
        save_checkpoint(Path(job["out"]), whole, tok, student.dir, opt_state, trainer, x.seed, cfg.optimizer_state)
        scratch = Path(job["scratch"])
        pq.write_table(old_logprobs_table(seqs), scratch / "old_logprobs.parquet")
        (scratch / "result.json").write_text(json.dumps({"rows": rows, "sequences": len(seqs)}))


def main(argv: list[str] | None = None) -> None:
    """One rank (started by torchrun): JOB.json is the only argument."""
    import torch.distributed as dist

    from opd_tasks.backends.hf import resolve_device
    from storage.hashing import sha256_json

    job = json.loads(Path((argv if argv is not None else sys.argv[1:])[0]).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        dev = resolve_device(job["device"])
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(sha256_json(["update-rng", job["inputs"]["seed"]])[:15], 16))
            _train_rank(job, rank, world, dev)
        # no barrier: no collective follows, and torchrun waits for every rank (a barrier would time out the
        # other ranks while rank 0 alone writes a large checkpoint)
        dist.destroy_process_group()
    except BaseException as e:
        (Path(job["scratch"]) / f"error-rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "type": type(e).__name__, "message": str(e), "time": time.time()}))
        raise


if __name__ == "__main__":
    main()
