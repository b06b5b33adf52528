#!/usr/bin/env bash
# GPU check: one run of a few minutes on a single H100/H200 with no internet (issue 7, item 7).
#   bash scripts/gpu_check.sh [OUT_DIR]
# 1. says what this machine has, and what the check needs: torch with CUDA, transformers, pyarrow, pyyaml,
#    pydantic, numpy, safetensors, tokenizers, tqdm. duckdb and prefect are NOT needed (it uses the plain driver,
#    no Prefect). Missing packages other than torch/transformers are installed from a local wheel dir when one
#    is given (WHEELS=/path/to/wheels), since the machine has no internet;
# 2. runs `python -m bench.gpu_check`: the testbed models on CUDA with the `hf` backend through the plain
#    driver: baseline, then 3 OPD and 3 TOPD iterations, CPU-vs-CUDA parity of teacher log-probs, sampling
#    log-probs vs a teacher-forced recompute, seconds per stage and tokens/s;
# 3. when vLLM is importable: the backend parity tests (`pytest -ra tests/gpu`: vllm vs hf on the same tokens,
#    float32, stated tolerances; their output in OUT_DIR/vllm_parity.txt), then `python -m bench.vllm_check`:
#    rollout and scoring tokens/s of vllm vs hf on the same batch, and bf16 score parity (OUT_DIR/vllm_check.json).
#    Without vLLM it says so and skips them. Failed parity tests (or pytest missing, so none ran) make the
#    script exit 4 at the end, after the throughput figures. The vLLM parts have not run on a GPU yet.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/opd-gpu-check}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
echo "== gpu_check: $(date -u +%FT%TZ) on $(hostname); output in $out"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# module -> the distribution that provides it (pip names)
missing=$("$py" - <<'PY'
import importlib.util
need = {"torch": "torch", "transformers": "transformers", "pyarrow": "pyarrow", "yaml": "pyyaml",
        "pydantic": "pydantic", "numpy": "numpy", "safetensors": "safetensors", "tokenizers": "tokenizers",
        "tqdm": "tqdm"}
print(" ".join(dist for mod, dist in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  echo "missing Python packages: $missing"
  case " $missing " in *" torch "*|*" transformers "*)
    echo "torch (with CUDA) and transformers must already be installed on the GPU machine" >&2; exit 2;;
  esac
  if [ -n "${WHEELS:-}" ]; then
    site="${SITE_DIR:-/tmp/opd-gpu-site}"
    echo "installing $missing (and their dependencies) from $WHEELS into $site (no index)"
    # shellcheck disable=SC2086
    "$py" -m pip install -q --no-index --find-links "$WHEELS" --target "$site" $missing
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "set WHEELS=DIR to a directory of wheels for them (pip download them, with their dependencies, on a" \
         "machine with internet), or install them" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', ok); sys.exit(0 if ok else 3)" \
  || { echo "no CUDA device visible to torch: this check is for a GPU machine" >&2; exit 3; }

echo "== hf backend on CUDA (plain driver): OPD and TOPD, parity, stage throughputs"
"$py" -m bench.gpu_check --out "$out/gpu_check.json" --iterations 3

echo "== vLLM"
parity=0
if "$py" -c "from vllm import LLM" 2>/dev/null; then  # "import vllm" alone is lazy: it proves nothing
  echo "vLLM $("$py" -c 'import vllm; print(vllm.__version__)') is importable: backend parity tests, then throughput"
  if "$py" -c "import pytest" 2>/dev/null; then
    "$py" -m pytest -ra -q -p no:cacheprovider tests/gpu >"$out/vllm_parity.txt" 2>&1 || parity=$?
    tail -n 25 "$out/vllm_parity.txt"
    [ "$parity" -eq 0 ] || echo "vLLM parity tests FAILED (pytest exit $parity): $out/vllm_parity.txt" >&2
  else
    echo "pytest is not installed: the parity tests (tests/gpu) were NOT run" >&2
    parity=2
  fi
  "$py" -m bench.vllm_check --out "$out/vllm_check.json"
  # every engine call kills its child's process group (opd_tasks/backends/vllm.py): nothing of ours may be left
  if command -v nvidia-smi >/dev/null; then
    left=$(nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader || true)
    if [ -n "$left" ]; then
      echo "processes still hold the GPU after the vLLM checks (an orphaned engine?):" >&2
      echo "$left" >&2
    else
      echo "no process holds the GPU after the vLLM checks"
    fi
  fi
else
  echo "vLLM is not importable: vLLM parity tests and vllm-vs-hf throughput skipped (pip install" \
       "'opd-pipeline[vllm]')"
fi
echo "== done: $out/gpu_check.json"
[ "$parity" -eq 0 ] || exit 4
