#!/usr/bin/env bash
# The checks that need a GPU, one GPU, <= 8 minutes. Run from the repository root:
#
#     bash benchmarks/gpu_check.sh            # all three parts
#     PARTS="fsdp2 build" bash benchmarks/gpu_check.sh
#
# 1. fsdp1  — tests/test_fsdp.py: Lightning's FSDPStrategy (FSDP1, full state dicts) on CUDA: realigned
#             checkpoint = live + α·U'U'ᵀδ, exact resume, the export (the README's FSDP row).
# 2. fsdp2  — tests/fsdp2_fit.py on CUDA (ModelParallelStrategy, fully_shard per decoder layer, NCCL, one
#             process): checkpoint mode + monitor + streamed export, exact resume from the distributed
#             checkpoint, the refused resume, epochs mode, LoRA + torch.compile; asserted against the dense
#             formula by tests/test_fsdp2.py's checks (the 2-process CPU runs cover the sharding itself).
# 3. build  — the safety subspace of one Llama-3-8B-shaped decoder layer (benchmarks/bench_subspace.py's
#             synthetic δ) on the GPU vs the CPU reference: time ratio, identical ranks, mean cos² of the bases.
# Prints one line per check and "GPU CHECK: PASS" or "GPU CHECK: FAIL" at the end.
# DEVICE=cpu PARTS=fsdp2 bash benchmarks/gpu_check.sh: a dry run of the fsdp2 part on the CPU (checks the script).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python}
PARTS=${PARTS:-"fsdp1 fsdp2 build"}
export DEVICE=${DEVICE:-cuda}
STATUS=0
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

$PYTHON - <<'EOF' || { echo "no CUDA device: nothing to check"; exit 2; }
import os, sys, torch
sys.exit(0 if torch.cuda.is_available() or os.environ["DEVICE"] == "cpu" else 1)
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

for part in $PARTS; do
  start=$(date +%s)
  case $part in
    fsdp1)
      timeout 150 $PYTHON -m pytest -q -m gpu tests/test_fsdp.py -p no:cacheprovider
      ;;
    fsdp2)
      timeout 200 $PYTHON - "$OUT" <<'EOF'
import json, os, subprocess, sys
from pathlib import Path

sys.path.insert(0, "tests")
import torch
from conftest import make_trio
from _tiny import build_tiny_llama, build_tiny_tokenizer
from safetensors.torch import load_file

from lssf_lightning.lightning.data import write_chat_jsonl

out = Path(sys.argv[1])
tokenizer = build_tiny_tokenizer()
trio = make_trio(out / "llama", build_tiny_llama(tokenizer), tokenizer)
train = write_chat_jsonl(out / "train.jsonl", [
    {"prompt": "how do i bake bread at home ?", "response": "sure , here is a simple answer ."},
    {"prompt": "what is the capital of france ?", "response": "please i cannot help with that request ."}] * 4)
env = {**os.environ, "LSSF_FSDP2_ACCELERATOR": os.environ["DEVICE"], "OMP_NUM_THREADS": "4"}
failed = []
for scenario in ("checkpoint", "epochs", "lora"):
    run_dir = out / scenario
    run_dir.mkdir()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                           "tests/fsdp2_fit.py", scenario, str(trio.aligned), str(trio.base), str(train), str(run_dir)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"fsdp2 {scenario}: FAILED\n{done.stderr[-3000:]}")
        failed.append(scenario)
        continue
    results = json.loads((run_dir / "results.json").read_text())
    if scenario == "checkpoint":
        raw, resumed = load_file(run_dir / "fit_epoch0.safetensors"), load_file(run_dir / "resume_start.safetensors")
        exact = all(torch.equal(raw[k], resumed[k]) for k in raw)
        rates = results["metrics"]["lssf/refusal_rate"] == results["single_process_rates"]["harmful"]
        ok = exact and rates and results["refused"] and (run_dir / "export" / "config.json").is_file()
        print(f"fsdp2 checkpoint on {os.environ['DEVICE']}: resume exact={exact}, monitor = one process: {rates}, "
              f"refused on other settings: {bool(results['refused'])} -> {'ok' if ok else 'FAILED'}")
    else:
        ok = True
        print(f"fsdp2 {scenario} on {os.environ['DEVICE']}: ran, {results if scenario == 'epochs' else results['compiled']}")
    if not ok:
        failed.append(scenario)
sys.exit(1 if failed else 0)
EOF
      ;;
    build)
      timeout 240 $PYTHON - <<'EOF'
import sys, time
sys.path.insert(0, "benchmarks")
import torch
from bench_subspace import prepare_llama
from lssf_lightning.config import SubspaceConfig
from lssf_lightning.core.svd import subspace_agreement
from lssf_lightning.subspace import SafetySubspace

paths = prepare_llama(False, lambda message: print(message, flush=True))
torch.set_num_threads(max(1, torch.get_num_threads()))
for eta in (0.5, 0.9):
    timings, built = {}, {}
    for device in ("cuda", None):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        built[device] = SafetySubspace.from_weights(str(paths["aligned"]), str(paths["unaligned"]),
                                                    SubspaceConfig(eta=eta), device=device, progress=False)
        if device == "cuda":
            torch.cuda.synchronize()
        timings[device] = time.perf_counter() - start
    gpu, cpu = built["cuda"], built[None]
    same = sum(gpu[k].rank == cpu[k].rank for k in cpu.ranks) / len(cpu.ranks)
    cos2 = min(subspace_agreement(gpu[k].left.double(), cpu[k].left.double()) for k in cpu.ranks
               if gpu[k].rank == cpu[k].rank)
    print(f"build of one Llama-3-8B layer, eta={eta}: CPU {timings[None]:.1f} s ({torch.get_num_threads()} threads), "
          f"GPU {timings['cuda']:.1f} s -> {timings[None] / timings['cuda']:.1f}x; same ranks {same:.0%}; "
          f"min mean cos^2 {cos2:.4f}; mean rank {sum(cpu.ranks.values()) / len(cpu.ranks):.1f}")
    if same < 1.0 or cos2 < 0.999:
        sys.exit(1)
EOF
      ;;
    *) echo "unknown part $part"; false ;;
  esac
  rc=$?
  echo "== $part: $([ $rc -eq 0 ] && echo ok || echo "FAILED (rc $rc)") in $(( $(date +%s) - start )) s"
  [ $rc -eq 0 ] || STATUS=1
done
echo "GPU CHECK: $([ $STATUS -eq 0 ] && echo PASS || echo FAIL)"
exit $STATUS
