#!/usr/bin/env bash
# GPU check (issue 19, "Measure"): under 10 minutes on one H100/H200 that has torch with CUDA and transformers but
# no internet and no other packages.
#   bash scripts/gpu_check.sh [OUT_DIR]                  # on the GPU machine (default OUT_DIR /tmp/opd-gpu-check)
#   CPU_SMOKE=1 bash scripts/gpu_check.sh [OUT_DIR]      # every step on the CPU at tiny sizes (no GPU needed)
#
# 1. Packages. Needed besides torch and transformers (and what transformers brings: numpy, safetensors, tokenizers,
#    pyyaml): pyarrow, pydantic, rich, and pytest for the parity tests. NOT needed: prefect, duckdb, datasets, typer,
#    matplotlib (the check uses the plain driver). Missing ones are installed from a directory of wheels when one is
#    given (WHEELS=/path/to/wheels; into SITE_DIR, default /tmp/opd-gpu-site, put first on PYTHONPATH), since the
#    machine has no internet. Make that directory on a machine with internet, for the GPU machine's Python version
#    and architecture (pyarrow, pydantic-core and pyyaml are compiled wheels; the others are pure Python):
#      pip download -d wheels --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#        --platform manylinux2014_x86_64 pyarrow pydantic pyyaml rich pytest
#    which also brings their dependencies (pydantic-core, annotated-types, typing-extensions, typing-inspection;
#    markdown-it-py, mdurl, pygments; pluggy, iniconfig, packaging). The script prints that command for this machine.
# 2. `python -m bench.gpu_check` (bench/gpu_check.py says what each figure is), into OUT_DIR/gpu_check.json:
#    the testbed pipeline on CUDA with the gates on (OPD and TOPD, 2 iterations each, gate figures per iteration),
#    CPU-vs-CUDA parity of teacher log-probs; the teacher's re-score repeatability in bf16 and fp32 (batch 1 vs all,
#    and what the gate compares); at the Qwen3-1.7B and Qwen3-8B shapes with random weights: rollout, scoring and
#    update tokens/s, MFU against the GPU's bf16 dense peak, peak GPU memory per stage (the update at 1.7B only:
#    8B's float32 training state does not fit on one GPU). Cut at BENCH_TIMEOUT seconds (default 420); the JSON
#    keeps every part that finished.
# 3. The backend parity tests, `pytest --noconftest tests/gpu` (OUT_DIR/parity_tests.txt; cut at PARITY_TIMEOUT,
#    default 150 s): the hf cases (hf on CUDA vs hf on the CPU, float32, stated tolerances) always; the vllm cases
#    when vLLM is importable (skipped otherwise, with the reason). --noconftest: tests/conftest.py sets up Prefect,
#    which this machine lacks.
# 4. When vLLM is importable: `python -m bench.vllm_check` (vllm vs hf tokens/s and bf16 score parity,
#    OUT_DIR/vllm_check.json), then which processes still hold the GPU. Without vLLM it says so and skips it.
# 5. The real recipe (configs/smollm2-context.yaml, one iteration, device cuda) when the imported model and
#    `datasets` are there (`python -m bench real_recipe`, OUT_DIR/real_recipe.json); skipped otherwise, saying why.
# Exit status: 2 a required package is missing, 3 no CUDA device, 4 the parity tests failed or did not run (no
# pytest), 5 a part of bench.gpu_check failed or timed out, or a gate stopped a pipeline run (under "errors" in the
# JSON); 4 and 5 only at the end, after every step has run.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/opd-gpu-check}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
smoke="${CPU_SMOKE:-0}"
echo "== gpu_check: $(date -u +%FT%TZ) on $(hostname); output in $out$([ "$smoke" = 1 ] && echo ' (CPU smoke run)')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# module -> the distribution that provides it (pip names); line 1 the missing required ones, line 2 pytest if missing
pkgs=$("$py" - <<'PY'
import importlib.util
need = {"torch": "torch", "transformers": "transformers", "tokenizers": "tokenizers", "safetensors": "safetensors",
        "numpy": "numpy", "yaml": "pyyaml", "pyarrow": "pyarrow", "pydantic": "pydantic", "rich": "rich"}
want = {"pytest": "pytest"}
for d in (need, want):
    print(" ".join(dist for mod, dist in d.items() if importlib.util.find_spec(mod) is None))
PY
)
missing=$(sed -n 1p <<<"$pkgs"); wanted=$(sed -n 2p <<<"$pkgs")
if [ -n "$missing$wanted" ]; then
  echo "missing Python packages: ${missing:-none required}${wanted:+ (and $wanted, for the parity tests)}"
  case " $missing " in *" torch "*|*" transformers "*)
    echo "torch (with CUDA) and transformers must already be installed on the GPU machine" >&2; exit 2;;
  esac
  if [ -n "${WHEELS:-}" ]; then
    site="${SITE_DIR:-/tmp/opd-gpu-site}"
    echo "installing $missing $wanted (and their dependencies) from $WHEELS into $site (no index)"
    # shellcheck disable=SC2086
    "$py" -m pip install -q --no-index --find-links "$WHEELS" --target "$site" $missing $wanted
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    pyver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    echo "set WHEELS=DIR to a directory of wheels for them; make it on a machine with internet with" >&2
    echo "  pip download -d DIR --only-binary=:all: --python-version $pyver --platform manylinux_2_28_$(uname -m)" \
         "--platform manylinux2014_$(uname -m) $missing $wanted" >&2
    if [ -n "$missing" ]; then exit 2; fi
    echo "continuing without $wanted: the parity tests will not run (exit 4 at the end)" >&2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
export OPD_HOME="${OPD_HOME:-$out/opd-home}"  # the parity tests' caches, away from ~
if [ "$smoke" = 1 ]; then
  bench_args=(--device cpu --shapes tiny --prompts 8 --iterations 2)
else
  "$py" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', ok); sys.exit(0 if ok else 3)" \
    || { echo "no CUDA device visible to torch: this check is for a GPU machine (CPU_SMOKE=1 for a dry run)" >&2; exit 3; }
  bench_args=(--device cuda --shapes 1.7B,8B --prompts 64 --iterations 2)
fi

echo "== bench.gpu_check: pipeline with gates (OPD, TOPD), teacher re-score repeatability, real-shape throughput"
bench=0
timeout -k 15 "${BENCH_TIMEOUT:-420}" "$py" -m bench.gpu_check --out "$out/gpu_check.json" "${bench_args[@]}" || bench=$?
[ "$bench" -eq 0 ] || echo "bench.gpu_check FAILED or timed out (exit $bench): see $out/gpu_check.json" >&2

echo "== backend parity tests (tests/gpu): hf always, vllm when importable"
parity=0
if "$py" -c "import pytest" 2>/dev/null; then
  timeout -k 15 "${PARITY_TIMEOUT:-150}" "$py" -m pytest -ra -q -p no:cacheprovider --noconftest tests/gpu \
    >"$out/parity_tests.txt" 2>&1 || parity=$?
  tail -n 25 "$out/parity_tests.txt"
  [ "$parity" -eq 0 ] || echo "parity tests FAILED (pytest exit $parity): $out/parity_tests.txt" >&2
else
  echo "pytest is not installed: the parity tests (tests/gpu) were NOT run" >&2
  parity=2
fi

echo "== vLLM"
if [ "$smoke" != 1 ] && "$py" -c "from vllm import LLM" 2>/dev/null; then  # "import vllm" alone is lazy
  echo "vLLM $("$py" -c 'import vllm; print(vllm.__version__)') is importable: vllm vs hf throughput"
  "$py" -m bench.vllm_check --out "$out/vllm_check.json" || echo "bench.vllm_check FAILED" >&2
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
  echo "vLLM is not importable (or a CPU smoke run): vllm-vs-hf throughput skipped (pip install 'opd-pipeline[vllm]')"
fi
echo "== the real recipe on CUDA (hf backend): configs/smollm2-context.yaml, one iteration"
# It needs the imported model under REAL_ROOT (default $OPD_HOME, else ./.opd: `make real`, or
# `opd models import FILE.gguf --root DIR` where the gguf and accelerate packages are) and `datasets` (the recipe
# reads a jsonl). Its figures (accuracy, reverse KL, seconds and peak memory per stage, disk) go to
# OUT_DIR/real_recipe.json; a failure here is reported, not fatal (the check's exit status is the steps above).
real_root="${REAL_ROOT:-${OPD_HOME:-.opd}}"
if [ "$smoke" = 1 ]; then
  echo "CPU smoke run: the real recipe skipped (minutes per iteration on a CPU: make run CONFIG=configs/smollm2-context.yaml)"
elif [ ! -f "$real_root/models/smollm2-135m-instruct/config.json" ]; then
  echo "the real model is not imported under $real_root (make real; REAL_ROOT=DIR): the real recipe skipped"
elif ! "$py" -c "import datasets" 2>/dev/null; then
  echo "the datasets package is not importable (the recipe reads a jsonl through it): the real recipe skipped"
else
  timeout "${REAL_TIMEOUT:-300}" "$py" -m bench.real_recipe --root "$real_root" --set device=cuda --set iterations=1 \
    --set name=smollm2-context-cuda --out "$out/real_recipe.json" || echo "the real recipe FAILED or timed out" >&2
fi
echo "== done: $out/gpu_check.json"
[ "$parity" -eq 0 ] || exit 4
[ "$bench" -eq 0 ] || exit 5
