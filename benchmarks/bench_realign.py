"""Time and peak memory of `realign` against a plain safetensors copy and an all-in-memory realignment.

    python benchmarks/bench_realign.py [--models DIR]

Inputs: the demo's real base / aligned / fine-tuned SmolLM2-135M directories when `lssf-lightning demo` has
written them (``demo_output/models``), otherwise real SmolLM2-135M weights as the base with a synthetic safety
vector (aligned = base + δ) and a synthetic fine-tune (fine-tuned = aligned + noise). Every measurement runs
in its own process; memory is the peak resident set minus the resident set of the same process once its
imports are done ("above an idle interpreter"). Files are read once beforehand so that every row reads
from the page cache; with ``--cold`` (root only) the page cache is dropped before every row instead, so that
every row reads from disk, as a post-hoc run on a freshly downloaded checkpoint does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROWS = {
    "copy": """
        from safetensors.torch import load_file, save_file
        start()
        tensors = {}
        for file in sorted(Path(FT).glob("*.safetensors")):
            tensors.update(load_file(file))
        save_file(tensors, f"{OUT}/model.safetensors", metadata={"format": "pt"})
    """,
    "realign": """
        from lssf_lightning.realign import realign_checkpoint
        start()
        realign_checkpoint(FT, f"{OUT}/model", aligned=ALIGNED, unaligned=BASE, progress=False)
    """,
    "realign --subspace": """
        from lssf_lightning.realign import realign_checkpoint
        from lssf_lightning.subspace import SafetySubspace
        SafetySubspace.from_weights(ALIGNED, BASE, progress=False).save(f"{OUT}.subspace")
        start()
        realign_checkpoint(FT, f"{OUT}/model", subspace=f"{OUT}.subspace", progress=False)
    """,
    "all in memory (reference)": """
        import torch
        from safetensors.torch import load_file, save_file
        from lssf_lightning.core.entropy import safety_critical_rank
        start()
        def load(d):
            out = {}
            for file in sorted(Path(d).glob("*.safetensors")):
                out.update(load_file(file))
            return out
        ft, al, ba = load(FT), load(ALIGNED), load(BASE)
        for key, w in ft.items():
            if w.ndim == 2 and ".layers." in key:
                delta = al[key].float() - ba[key].float()
                u, s, _ = torch.linalg.svd(delta, full_matrices=False)
                r = safety_critical_rank(s, 0.9)
                ft[key] = (w.float() + u[:, :r] @ (u[:, :r].T @ delta)).to(w.dtype)
        save_file(ft, f"{OUT}/model.safetensors", metadata={"format": "pt"})
    """,
}

PRELUDE = """
import json, resource, sys, time
from pathlib import Path
import torch
torch.set_num_threads({threads})
FT, ALIGNED, BASE, OUT = {ft!r}, {aligned!r}, {base!r}, {out!r}
Path(OUT).mkdir(parents=True, exist_ok=True)

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

def start():
    global T0, IDLE
    IDLE, T0 = rss_mb(), time.perf_counter()
"""

EPILOGUE = """
seconds = time.perf_counter() - T0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_above_idle_mb": peak - IDLE}))
"""


def model_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def prepare_synthetic(root: Path) -> tuple[Path, Path, Path]:
    """Real SmolLM2-135M as the base; aligned = base + a realistic δ; fine-tuned = aligned + noise."""
    import torch

    from lssf_lightning.demo.assets import base_model_dir
    from lssf_lightning.io.export import copy_support_files
    from lssf_lightning.io.shards import SafetensorsReader, write_safetensors

    base = base_model_dir()
    reader = SafetensorsReader(sorted(base.glob("*.safetensors")))
    generator = torch.Generator().manual_seed(0)
    for name, scale in (("aligned", 1.0), ("finetuned", None)):
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        source = (
            SafetensorsReader(sorted((root / "aligned").glob("*.safetensors"))) if scale is None else reader
        )
        tensors, keys = {}, source.keys()
        for key in keys:
            w = source.get(key)
            if w.ndim == 2 and ".layers." in key:
                if scale is not None:  # a decaying spectrum, like a short safety fine-tune's update
                    rank = 64
                    left = torch.randn(w.shape[0], rank, generator=generator)
                    right = torch.randn(rank, w.shape[1], generator=generator)
                    decay = torch.tensor([0.9**i for i in range(rank)])
                    update = (left * decay) @ right / rank + 0.02 * torch.randn(w.shape, generator=generator)
                    w = w + 1e-3 * update
                else:
                    w = w + 1e-4 * torch.randn(w.shape, generator=generator)
            tensors[key] = w
        write_safetensors(out / "model.safetensors", tensors, {"format": "pt"})
        copy_support_files([base], out)
    return base, root / "aligned", root / "finetuned"


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def measure(
    name: str, code: str, ft: Path, aligned: Path, base: Path, work: Path, threads: int, cold: bool = False
) -> dict:
    out = work / name.replace(" ", "_").replace("(", "").replace(")", "")
    shutil.rmtree(out, ignore_errors=True)
    if cold:
        drop_page_cache()
    script = PRELUDE.format(threads=threads, ft=str(ft), aligned=str(aligned), base=str(base), out=str(out))
    script += textwrap.dedent(code) + EPILOGUE
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="demo_output/models", help="directory with base/aligned/finetuned"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--cold", action="store_true", help="drop the page cache before every row (needs root)"
    )
    args = parser.parse_args()
    if args.cold and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        parser.error("--cold needs write access to /proc/sys/vm/drop_caches (run as root)")
    work = Path(tempfile.mkdtemp(prefix="lssf-bench-"))
    models = Path(args.models)
    try:
        if all((models / n / "config.json").is_file() for n in ("base", "aligned", "finetuned")):
            base, aligned, ft = models / "base", models / "aligned", models / "finetuned"
            source = f"the demo's real models in {models}"
        else:
            base, aligned, ft = prepare_synthetic(work / "inputs")
            source = "real SmolLM2-135M base, synthetic safety vector and fine-tune"
        for directory in () if args.cold else (base, aligned, ft):  # warm the page cache
            for file in directory.glob("*.safetensors"):
                with open(file, "rb") as f:
                    while f.read(1 << 24):
                        pass
        size_mb = model_bytes(ft) / 1e6 / 1.048576
        cache = "cold page cache (dropped before every row)" if args.cold else "warm page cache"
        print(f"inputs: {source}; one model = {size_mb:.0f} MiB; {args.threads} threads; {cache}")
        results = {
            name: measure(name, code, ft, aligned, base, work, args.threads, args.cold)
            for name, code in ROWS.items()
        }
        copy = results["copy"]
        print(f"{'':28} {'seconds':>8} {'x copy':>7} {'peak MiB':>9} {'x model':>8}")
        for name, row in results.items():
            print(
                f"{name:28} {row['seconds']:8.2f} {row['seconds'] / copy['seconds']:7.2f} "
                f"{row['peak_above_idle_mb']:9.0f} {row['peak_above_idle_mb'] / size_mb:8.2f}"
            )
        print("targets: realign peak <= 1.3 x model, realign time <= 2 x copy")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
