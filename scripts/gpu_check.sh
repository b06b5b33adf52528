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
# 3. runs the vLLM parity tests when vLLM is importable. There are none yet: the vLLM backend is not built
#    (issue 7), and the script says so rather than pass silently.
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
if "$py" -c "import vllm" 2>/dev/null; then
  echo "vLLM $("$py" -c 'import vllm; print(vllm.__version__)') is importable, but the vllm backend is not built" \
       "yet (issue 7): no parity tests to run"
else
  echo "vLLM is not importable: vLLM parity skipped (and the vllm backend is not built yet, issue 7)"
fi
echo "== done: $out/gpu_check.json"
