"""Backends: what the rollout and scoring stages generate and score with, behind one small interface.

- `hf` (opd_tasks/backends/hf.py): transformers on CPU or CUDA, in the stage's own process.
- `vllm` (opd_tasks/backends/vllm.py): `vllm.LLM` on CUDA, in a child process per call (not yet run on a GPU).

A stage asks `backend_for(section, device)` for the backend its config section names and calls
`generate` / `score`; it never branches on the backend's name. Both return the same records, so the stages
write the same tables either way. The only difference a stage sees is `full_entropy`: vLLM returns the top-k
of each distribution, not its full-vocabulary entropy.

This module imports neither torch nor vLLM: the backends load them when constructed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from opd_tasks.config import RolloutConfig, ScoringConfig
    from opd_tasks.models import ModelSpec


@dataclass
class Generated:
    """One sampled completion."""

    prompt_index: int
    sample_id: int
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # "stop" (EOS generated, included in token_ids) or "length"


@dataclass
class TokenScores:
    """Per completion token of one sequence (`entropy` is empty where the backend has no full entropy)."""

    logprob: list[float]
    entropy: list[float]
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]


def as_token_ids(eos_token_id: int | Sequence[int]) -> list[int]:
    """The stop ids a backend was given, one id or several (as transformers' `generate` takes them), as a list.
    Which ids end a model's completions is decided by `opd_tasks.backends.hf.stop_token_ids`."""
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"eos_token_id must be a token id or a non-empty list of token ids, got {eos_token_id!r}")
    return [int(t) for t in ids]


class Backend(Protocol):
    """Generation and teacher forcing over token ids; log-probs of the model's raw (temperature 1) distribution."""

    name: str
    full_entropy: bool  # `score` returns each distribution's full-vocabulary entropy

    def generate(self, model: ModelSpec, prompts: Sequence[Sequence[int]], *, eos_token_id: int | Sequence[int],
                 pad_token_id: int, n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int,
                 want_logprobs: bool = True, desc: str = "generate", progress: bool = True,
                 first_prompt: int = 0) -> list[Generated]:
        """`n` completions per prompt (greedy when temperature is 0), ordered by (prompt, sample); each ends at
        the first of the ids `eos_token_id` (`hf.stop_token_ids`: every EOS the model declares). `first_prompt`:
        where `prompts` start among the stage's prompts (a shard's part): the samples' seeds are those of the
        whole stage (opd_tasks/stages/registry.py)."""
        ...

    def score(self, model: ModelSpec, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
              pad_token_id: int, top_k: int, desc: str = "score", progress: bool = True) -> list[TokenScores]:
        """Teacher-forced log-prob of each completion token, the top-k and (with `full_entropy`) the entropy."""
        ...


class HfBackend:
    """transformers `generate` and teacher forcing in this process, on `device` (auto: CUDA if available)."""

    name = "hf"
    full_entropy = True

    def __init__(self, device: str = "auto", batch_size: int = 64):
        self.device, self.batch_size = device, batch_size

    def _load(self, model: ModelSpec):
        from opd_tasks.backends.hf import resolve_device
        from opd_tasks.backends.loaded import LOADED

        return LOADED.model(model, resolve_device(self.device))  # loaded once per process (backends/loaded.py)

    def generate(self, model, prompts, *, eos_token_id, pad_token_id, n, temperature, top_p, max_new_tokens, seed,
                 want_logprobs=True, desc="generate", progress=True, first_prompt=0):
        from opd_tasks.backends.hf import generate

        return generate(self._load(model), prompts, eos_token_id=eos_token_id, pad_token_id=pad_token_id, n=n,
                        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                        batch_size=self.batch_size, seed=seed, want_logprobs=want_logprobs, desc=desc,
                        progress=progress, first_prompt=first_prompt)

    def score(self, model, prompts, completions, *, pad_token_id, top_k, desc="score", progress=True):
        from opd_tasks.backends.hf import score_sequences

        return score_sequences(self._load(model), prompts, completions, pad_token_id=pad_token_id, top_k=top_k,
                               batch_size=self.batch_size, desc=desc, progress=progress)


class VllmBackend:
    """`vllm.LLM` in a child process per call (opd_tasks/backends/vllm.py). Refuses at construction, before any
    work, when vLLM or enough CUDA devices are missing, naming the config field that chose it."""

    name = "vllm"
    full_entropy = False

    def __init__(self, section: RolloutConfig | ScoringConfig, device: str, field: str):
        from opd_tasks.backends.vllm import require_vllm

        require_vllm(field, device, section.tensor_parallel_size)
        self.engine = dict(tensor_parallel_size=section.tensor_parallel_size,
                           gpu_memory_utilization=section.gpu_memory_utilization,
                           max_model_len=section.max_model_len, enforce_eager=section.enforce_eager)

    def generate(self, model, prompts, *, eos_token_id, pad_token_id, n, temperature, top_p, max_new_tokens, seed,
                 want_logprobs=True, desc="generate", progress=True, first_prompt=0):
        import logging

        from opd_tasks.backends import vllm

        records, info = vllm.generate(model.path, prompts, eos_token_id=eos_token_id, n=n, temperature=temperature,
                                      top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, dtype=model.dtype,
                                      trust_remote_code=model.trust_remote_code, progress=progress,
                                      first_prompt=first_prompt, **self.engine)
        logging.getLogger(__name__).info("vllm %s: %s", desc, info)
        return [Generated(**r) for r in records]

    def score(self, model, prompts, completions, *, pad_token_id, top_k, desc="score", progress=True):
        import logging

        from opd_tasks.backends import vllm

        records, info = vllm.score(model.path, prompts, completions, top_k=top_k, dtype=model.dtype,
                                   trust_remote_code=model.trust_remote_code, progress=progress, **self.engine)
        logging.getLogger(__name__).info("vllm %s: %s", desc, info)
        return [TokenScores(logprob=r["logprob"], entropy=[], topk_ids=r["topk_ids"],
                            topk_logprobs=r["topk_logprobs"]) for r in records]


def prompts_per_batch(section: RolloutConfig | ScoringConfig, n: int) -> int:
    """Prompts the backend `section.backend` generates together in one seeded batch, `n` samples each: a shard
    of a generating stage starts on a multiple of it (opd_tasks/stages/registry.py). vLLM seeds each request
    by its prompt's index, so any boundary will do."""
    return 1 if section.backend == "vllm" else hf_prompts_per_batch(section.batch_size, n)


def hf_prompts_per_batch(batch_size: int, n: int) -> int:
    """Prompts in one `hf.generate` batch of `batch_size` sequences, `n` per prompt."""
    return max(1, batch_size // n)


def backend_for(section: RolloutConfig | ScoringConfig, device: str, field: str) -> Backend:
    """The backend `section.backend` names (`field`, e.g. 'rollout.backend', is named in its errors)."""
    if section.backend == "vllm":
        return VllmBackend(section, device, field)
    return HfBackend(device, section.batch_size)
