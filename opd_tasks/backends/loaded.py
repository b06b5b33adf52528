"""Models and tokenizers loaded once per process, for the stages that only read them.

A stage names its models by `ModelSpec`: a directory plus the sha256 of its files. `LOADED.model(spec, device)`
returns that model for inference, loaded the first time and kept for the next stage in this process (the plain
driver, and the distill flow's inline stage tasks): the teacher is loaded once per run, a student once per
iteration, instead of once per stage. A stage that runs in a process of its own (a deployment run, a pod)
starts with nothing and loads what it needs.

- Keys: a model by (sha256, dtype on the device: "auto" on a CPU is float32, device, trust_remote_code); a
  tokenizer by (sha256, trust_remote_code). The path is not part of the key: two directories with the same files
  are the same model, and a file edited in place is a different one (its spec has another hash).
- Models handed out are in eval mode with gradients off. Callers must not change them (no `.train()`, no weight
  edits): the next stage gets the same object. The update stage trains a model of its own, loaded with
  `load_causal_lm`, never one from here.
- At most `OPD_MODELS_IN_MEMORY` models are kept (default 2: a teacher and the current student), the least
  recently used dropped first; 0 turns the cache off. `release()` drops them all (the update stage does that on
  a GPU before it loads the model it trains).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from opd_tasks.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from opd_tasks.models import ModelSpec

CAPACITY_ENV = "OPD_MODELS_IN_MEMORY"
DEFAULT_CAPACITY = 2


def capacity() -> int:
    """`OPD_MODELS_IN_MEMORY`: how many models a process keeps loaded (0: none)."""
    raw = os.environ.get(CAPACITY_ENV, "").strip()
    if not raw:
        return DEFAULT_CAPACITY
    if not raw.isdigit():
        raise ConfigError(f"{CAPACITY_ENV}={raw!r}: expected a whole number of models >= 0 (0 turns the cache off; "
                          f"default {DEFAULT_CAPACITY})")
    return int(raw)


class LoadedModels:
    """The process's loaded models and tokenizers (see the module docstring). Thread-safe."""

    def __init__(self) -> None:
        self._models: OrderedDict[tuple, Any] = OrderedDict()
        self._tokenizers: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self.loads = 0  # models loaded from disk (what a test or a benchmark counts)
        self.hits = 0

    def model(self, spec: ModelSpec, device: torch.device) -> Any:
        """The model of `spec` on `device`, in its configured dtype, for inference."""
        from opd_tasks.backends.hf import load_causal_lm, resolve_dtype

        key = (spec.sha256, str(resolve_dtype(spec.dtype, device)), str(device), spec.trust_remote_code)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                self.hits += 1
                return self._models[key]
        model = load_causal_lm(spec.path, device, spec.dtype, spec.trust_remote_code).requires_grad_(False)
        keep = capacity()
        with self._lock:
            self.loads += 1
            if keep > 0:
                self._models[key] = model
                while len(self._models) > keep:
                    self._models.popitem(last=False)
        return model

    def tokenizer(self, spec: ModelSpec) -> Any:
        """The tokenizer of `spec` (`hf.load_tokenizer`: EOS required, PAD = EOS when missing). Tokenizers are small:
        every one used is kept."""
        from opd_tasks.backends.hf import load_tokenizer

        key = (spec.sha256, spec.trust_remote_code)
        with self._lock:
            if key in self._tokenizers:
                return self._tokenizers[key]
        tok = load_tokenizer(spec.path, spec.trust_remote_code)
        with self._lock:
            return self._tokenizers.setdefault(key, tok)

    def release(self) -> None:
        """Drop every loaded model (and free the GPU memory they held)."""
        with self._lock:
            on_gpu = any(next(iter(m.parameters())).is_cuda for m in self._models.values())
            self._models.clear()
        if on_gpu:
            import torch

            torch.cuda.empty_cache()


#: The one instance per process.
LOADED = LoadedModels()
