"""``lssf-lightning``: build, apply and inspect safety subspaces; fine-tune with the callback; run the demo.

    lssf-lightning subspace --aligned A --unaligned U --output S.safetensors [--eta 0.9 ...]
    lssf-lightning realign  --aligned A --unaligned U --finetuned F --output OUT [--method lssf|resta|safelora]
    lssf-lightning inspect  S.safetensors [--plot ranks.png]
    lssf-lightning fit      --config configs/demo.yaml       (LightningCLI)
    lssf-lightning demo     [--quick] [--output DIR]

Errors print one line and exit non-zero; set ``LSSF_LIGHTNING_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

__all__ = ["main"]


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line and exits with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _shard_size(text: str) -> int:
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
    if not found:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 2GB, 500MB)")
    number, unit = float(found[1]), found[2].upper().rstrip("B").rstrip("I")
    return int(number * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit])


def _patterns(values: list[str] | None):
    """``--target-modules q_proj v_proj`` → list; a single ``re:<regex>`` → regex string (peft semantics)."""
    if not values:
        return None
    if len(values) == 1 and values[0].startswith("re:"):
        return values[0][3:]
    if len(values) == 1 and values[0] == "all-linear":
        return "all-linear"
    return values


def _add_subspace_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("safety subspace")
    group.add_argument("--eta", type=float, default=0.9, help="share of the safety singular value entropy to keep, in (0, 1] (default 0.9)")
    group.add_argument("--alpha-1", type=float, default=1.0, help="weight of the strongest direction, Eq. 10 (default 1 = plain projector)")
    group.add_argument("--source", choices=("weights", "activations"), default="weights",
                       help="SVD of delta (data-free) or of delta·X̂ on calibration inputs (default weights)")
    group.add_argument("--calibration", help="calibration prompts/pairs (.txt/.jsonl/.csv) for --source activations")
    group.add_argument("--target-modules", nargs="+", metavar="NAME",
                       help="module-name suffixes to target, or one 're:<regex>' (default: all linear layers of the blocks)")
    group.add_argument("--exclude-modules", nargs="+", metavar="NAME", help="module-name suffixes (or 're:<regex>') to skip")
    group.add_argument("--max-rank", type=int, help="cap every rank at this value")
    group.add_argument("--svd-method", choices=("auto", "exact", "randomized", "gram"), default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="lssf-lightning", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    sub = commands.add_parser("subspace", help="compute a safety subspace and save it")
    sub.add_argument("--aligned", required=True, help="aligned model: HF directory or safetensors file(s)")
    sub.add_argument("--unaligned", required=True, help="unaligned counterpart: HF directory or safetensors file(s)")
    sub.add_argument("--output", required=True, help="where to write the subspace (.safetensors)")
    _add_subspace_options(sub)

    real = commands.add_parser("realign", help="write a realigned copy of a fine-tuned checkpoint")
    real.add_argument("--finetuned", required=True, help="fine-tuned HF directory, safetensors file, or peft LoRA adapter directory")
    real.add_argument("--output", required=True, help="output HF model directory (written atomically)")
    real.add_argument("--aligned", help="aligned model (HF directory); also the base of a LoRA adapter")
    real.add_argument("--unaligned", help="unaligned counterpart (HF directory)")
    real.add_argument("--subspace", help="a precomputed subspace file (skips the SVDs)")
    real.add_argument("--method", choices=("lssf", "resta", "safelora"), default="lssf")
    real.add_argument("--alpha", type=float, default=1.0, help="LSSF fusion strength (default 1)")
    real.add_argument("--beta", type=float, default=1.0, help="RESTA scale of the safety vector (default 1)")
    real.add_argument("--drop-rate", type=float, default=0.0, help="RESTA's DARE drop probability (default 0 = off)")
    real.add_argument("--seed", type=int, default=0, help="DARE seed")
    real.add_argument("--threshold", type=float, default=0.5, help="SafeLoRA cosine threshold tau (default 0.5)")
    real.add_argument("--max-shard-size", type=_shard_size, default="2GB", help="output shard size (default 2GB)")
    real.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_subspace_options(real)

    ins = commands.add_parser("inspect", help="print a subspace's per-matrix ranks and entropies")
    ins.add_argument("subspace", help="a subspace file written by `lssf-lightning subspace`")
    ins.add_argument("--plot", help="also draw ranks and entropies per layer into this PNG")
    ins.add_argument("--all", action="store_true", help="print every matrix (default: the first 40)")

    commands.add_parser("demo", help="the built-in end-to-end demo on SmolLM2-135M (offline, CPU; "
                        "see `lssf-lightning demo --help`)", add_help=False)

    commands.add_parser("fit", help="fine-tune with LSSFCallback via LightningCLI (see `lssf-lightning fit --help`)",
                        add_help=False)
    return parser


def _subspace_kwargs(args) -> dict:
    return {
        "eta": args.eta,
        "alpha_1": args.alpha_1,
        "source": args.source,
        "calibration": args.calibration,
        "target_modules": _patterns(args.target_modules),
        "exclude_modules": _patterns(args.exclude_modules),
        "max_rank": args.max_rank,
    }


def _run_subspace(args) -> None:
    from lssf_lightning.subspace import SafetySubspace

    subspace = SafetySubspace.from_weights(args.aligned, args.unaligned, svd_method=args.svd_method, **_subspace_kwargs(args))
    path = subspace.save(args.output)
    print(subspace.summary(max_rows=0 if len(subspace) > 40 else None).splitlines()[-1])
    print(f"saved {path}")


def _run_realign(args) -> None:
    from lssf_lightning.realign import realign_checkpoint

    kwargs = _subspace_kwargs(args)
    report = realign_checkpoint(
        args.finetuned, args.output, aligned=args.aligned, unaligned=args.unaligned, method=args.method,
        subspace=args.subspace, alpha=args.alpha, beta=args.beta, drop_rate=args.drop_rate, seed=args.seed,
        threshold=args.threshold, max_shard_bytes=args.max_shard_size, overwrite=args.overwrite, **kwargs,
    )
    print(report)


def _run_inspect(args) -> None:
    from lssf_lightning.subspace import SafetySubspace

    subspace = SafetySubspace.load(args.subspace)
    print(subspace.summary(max_rows=None if args.all else 40))
    if args.plot:
        from lssf_lightning.plots import plot_subspace

        print(f"saved {plot_subspace(subspace, args.plot)}")


def _run_demo(argv: Sequence[str]) -> None:
    from lssf_lightning.demo.run import main as demo_main

    demo_main(list(argv))


def _run_fit(argv: Sequence[str]) -> None:
    from lssf_lightning.lightning.cli import run_fit_cli

    run_fit_cli(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    delegated = {"fit": _run_fit, "demo": _run_demo}  # these parse their own options
    if argv[:1] and argv[0] in delegated:
        return _guarded(lambda: delegated[argv[0]](argv[1:]), argv[0])
    args = build_parser().parse_args(argv)
    runner = {"subspace": _run_subspace, "realign": _run_realign, "inspect": _run_inspect}
    return _guarded(lambda: runner[args.command](args), args.command)


def _guarded(run, command: str) -> int:
    try:
        run()
    except KeyboardInterrupt:
        print(f"lssf-lightning {command}: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, ValueError, TypeError, ImportError, RuntimeError) as err:
        if os.environ.get("LSSF_LIGHTNING_DEBUG"):
            raise
        message = " ".join(str(err).split())
        print(f"lssf-lightning {command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
