"""``lssf-lightning``: build, apply and inspect safety subspaces; fine-tune with the callback; run the demo.

    lssf-lightning subspace --aligned A --unaligned U --output S.safetensors [--eta 0.9 ...]
    lssf-lightning realign  --aligned A --unaligned U --finetuned F --output OUT [--method lssf|resta|...]
    lssf-lightning inspect  S.safetensors [--plot ranks.png]
    lssf-lightning sweep    --aligned A --unaligned U --finetuned F --output DIR   (the safety–utility front)
    lssf-lightning fit      --config configs/demo.yaml       (LightningCLI)
    lssf-lightning demo     [--quick] [--output DIR]

Errors print one line and exit non-zero; set ``LSSF_LIGHTNING_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lssf_lightning.config import (
    DEFAULT_ADD,
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_DROP_RATE,
    DEFAULT_INPUT_SHARE,
    DEFAULT_SEED,
    DEFAULT_THRESHOLD,
    MAX_SHARD_BYTES,
    SOURCES,
    SVD_METHODS,
    SubspaceConfig,
)
from lssf_lightning.validation import (
    SettingError,
    check_cosine,
    check_drop_rate,
    check_finite,
    check_int,
    check_seed,
)

__all__ = ["main"]


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line and exits with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        """An unknown ``--option`` is named before any missing required one (``--aligend`` is a typo of
        ``--aligned``, not a missing ``--aligned``)."""
        if self._subparsers is None:  # a command's own parser (the top level hands its options on)
            options = [o for o in self._option_string_actions if o.startswith("--")]
            for arg in sys.argv[1:] if args is None else args:
                flag = str(arg).partition("=")[0]
                if flag == "--":
                    break
                if flag.startswith("--") and not any(o.startswith(flag) for o in options):
                    close = difflib.get_close_matches(flag, options, n=1)
                    hint = f"; did you mean {close[0]}?" if close else ""
                    self.error(f"unrecognized arguments: {flag}{hint}")
        return super().parse_known_args(args, namespace)


def _checked(check: Callable[..., Any], option: str, convert: Callable[[str], Any] = float, **limits):
    """An argparse ``type`` that converts the text and applies a rule of :mod:`lssf_lightning.validation`."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}") from None
        try:
            return check(option, value, **limits)
        except SettingError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = option  # argparse names the type in its messages
    return parse


class _RegisteredMethods:
    """``--method``'s choices: the names in :data:`lssf_lightning.methods.METHODS`, read when argparse first
    checks or lists them (importing the methods pulls in torch; ``--help`` of other commands stays fast).

    Importing :mod:`lssf_lightning.methods` also imports the modules that register further methods (the fusion
    variants), so every registered name is listed.
    """

    def _names(self) -> tuple[str, ...]:
        from lssf_lightning.methods import METHODS

        return tuple(METHODS)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def _shard_size(text: str) -> int:
    """``--max-shard-size``: ``2GB`` (10⁹), ``2GiB`` (2³⁰) or bytes, through ``huggingface_hub``'s parser."""
    from lssf_lightning.io.shards import parse_shard_size

    try:
        return parse_shard_size(text, "--max-shard-size")
    except SettingError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _field_help() -> dict[str, str]:
    """Each :class:`SubspaceConfig` field's description, from its docstring (the one place it is written)."""
    doc = (SubspaceConfig.__doc__ or "").split("Args:", 1)[-1]
    found: dict[str, str] = {}
    for match in re.finditer(r"^ {8}(\w+): (.*?)(?=^ {8}\w+: |\Z)", doc, re.MULTILINE | re.DOTALL):
        found[match[1]] = " ".join(match[2].split()).replace("``", "").replace("%", "%%").rstrip(".")
    return found


def _config_value(name: str, convert: Callable[[str], Any]):
    """An argparse ``type`` for the config field ``name``: validated by :class:`SubspaceConfig` itself."""

    def parse(text: str):
        try:
            value = convert(text)
            SubspaceConfig(**{name: value})
        except (ValueError, SettingError) as err:
            message = str(err) if isinstance(err, SettingError) else f"invalid value {text!r}"
            raise argparse.ArgumentTypeError(message) from None
        return value

    parse.__name__ = name
    return parse


# How each SubspaceConfig field reads from the command line; names, defaults and help come from the dataclass.
_FIELD_ARGS: dict[str, dict[str, Any]] = {
    "eta": {"type": _config_value("eta", float)},
    "alpha_1": {"type": _config_value("alpha_1", float)},
    "source": {"choices": SOURCES},
    "calibration": {"metavar": "FILE"},
    "target_modules": {"nargs": "+", "metavar": "NAME", "extra": "; one 're:<regex>' for a regex"},
    "exclude_modules": {"nargs": "+", "metavar": "NAME", "extra": "; one 're:<regex>' for a regex"},
    "max_rank": {"type": _config_value("max_rank", int)},
    "svd_method": {"choices": SVD_METHODS},
    "max_calibration_tokens": {"type": _config_value("max_calibration_tokens", int)},
}


def _add_subspace_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("safety subspace (SubspaceConfig)")
    helps = _field_help()
    for field in dataclasses.fields(SubspaceConfig):
        spec = dict(_FIELD_ARGS.get(field.name, {}))
        extra = spec.pop("extra", "")
        default = None if field.default is dataclasses.MISSING else field.default
        shown = "" if default is None else f" (default {default})"
        group.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            default=default,
            help=f"{helps.get(field.name, '')}{extra}{shown}",
            **spec,
        )
    group.add_argument(
        "--allow-partial",
        action="store_true",
        help="edit only the weights all inputs have in common (warns with the counts) instead of "
        "refusing inputs whose targeted weights do not correspond",
    )


def _patterns(values: list[str] | None):
    """``--target-modules q_proj v_proj`` → list; a single ``re:<regex>`` → regex string (peft semantics)."""
    if not values:
        return None
    if len(values) == 1 and values[0].startswith("re:"):
        return values[0][3:]
    if len(values) == 1 and values[0] == "all-linear":
        return "all-linear"
    return values


def _subspace_config(args) -> SubspaceConfig:
    """The :class:`SubspaceConfig` the subspace options spell."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(SubspaceConfig)}
    values["target_modules"] = _patterns(values["target_modules"])
    values["exclude_modules"] = _patterns(values["exclude_modules"])
    return SubspaceConfig(**values)


# realign's numeric method options: flag, rule of lssf_lightning.validation, conversion, default, help.
_METHOD_NUMBERS = (
    ("--alpha", check_finite, float, DEFAULT_ALPHA,
     f"LSSF fusion strength (default {DEFAULT_ALPHA:g})"),
    ("--add", check_finite, float, DEFAULT_ADD,
     f"lssf-reset / lssf-erosion / lssf-two-sided: strength of the additive term on top "
     f"(default {DEFAULT_ADD:g})"),
    ("--input-share", check_finite, float, DEFAULT_INPUT_SHARE,
     f"lssf-two-sided: share rho of the input-side reset (default {DEFAULT_INPUT_SHARE:g})"),
    ("--beta", check_finite, float, DEFAULT_BETA,
     f"RESTA scale of the safety vector (default {DEFAULT_BETA:g})"),
    ("--drop-rate", check_drop_rate, float, DEFAULT_DROP_RATE,
     f"RESTA's DARE drop probability in [0, 1) (default {DEFAULT_DROP_RATE:g}; 0 = off)"),
    ("--seed", check_seed, int, DEFAULT_SEED,
     f"DARE seed (default {DEFAULT_SEED})"),
    ("--threshold", check_cosine, float, DEFAULT_THRESHOLD,
     f"SafeLoRA cosine threshold tau in [-1, 1] (default {DEFAULT_THRESHOLD:g})"),
)


def _add_realign_options(real: argparse.ArgumentParser) -> None:
    real.add_argument(
        "--finetuned",
        required=True,
        help="fine-tuned HF directory, safetensors file, peft LoRA adapter directory, or hub ID",
    )
    real.add_argument("--output", required=True, help="output HF model directory (written atomically)")
    real.add_argument(
        "--aligned", help="aligned model (HF directory or hub ID); also the base of a LoRA adapter"
    )
    real.add_argument("--unaligned", help="unaligned counterpart (HF directory or hub ID)")
    real.add_argument("--subspace", help="a precomputed subspace file (skips the SVDs)")
    real.add_argument(
        "--method",
        default="lssf",
        choices=_RegisteredMethods(),
        metavar="METHOD",
        help="a registered realignment method: %(choices)s (default %(default)s)",
    )
    for flag, rule, convert, default, text in _METHOD_NUMBERS:
        real.add_argument(flag, type=_checked(rule, flag, convert), default=default, help=text)
    real.add_argument(
        "--max-shard-size",
        type=_shard_size,
        default=MAX_SHARD_BYTES,
        help=f"output shard size: 500MB, 2GB (decimal) or 2GiB (binary) "
        f"(default {MAX_SHARD_BYTES // 2**30}GiB)",
    )
    real.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    real.add_argument(
        "--as-adapter",
        action="store_true",
        help="write the correction of an LSSF form (--method lssf, lssf-reset, lssf-erosion, lssf-two-sided) "
        "as a peft LoRA adapter instead of a model (a LoRA --finetuned gets ONE adapter: its task LoRA + "
        "the correction, for its base model)",
    )
    real.add_argument(
        "--adapter-max-rank",
        type=_checked(check_int, "--adapter-max-rank", int, minimum=1),
        help="with --as-adapter: cap every module's LoRA rank (best rank-k approximation)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="lssf-lightning", description=__doc__.split("\n\n")[0].replace("``", ""))
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    sub = commands.add_parser("subspace", help="compute a safety subspace and save it")
    sub.add_argument(
        "--aligned",
        required=True,
        help="aligned model: HF directory, safetensors file, or hub ID "
        "(org/name[@revision], resolved through the Hugging Face cache)",
    )
    sub.add_argument(
        "--unaligned", required=True, help="unaligned counterpart: HF directory, safetensors file, or hub ID"
    )
    sub.add_argument("--output", required=True, help="where to write the subspace (.safetensors)")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing subspace file")
    _add_subspace_options(sub)

    real = commands.add_parser("realign", help="write a realigned copy of a fine-tuned checkpoint")
    _add_realign_options(real)
    _add_subspace_options(real)

    ins = commands.add_parser("inspect", help="print a subspace's per-matrix ranks and entropies")
    ins.add_argument("subspace", help="a subspace file written by `lssf-lightning subspace`")
    ins.add_argument("--plot", help="also draw ranks and entropies per layer into this PNG")
    ins.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    ins.add_argument("--all", action="store_true", help="print every matrix (default: the first 40)")

    commands.add_parser(
        "sweep",
        help="score a grid of realignments on validation prompts and general text, and "
        "recommend one (see `lssf-lightning sweep --help`)",
        add_help=False,
    )

    commands.add_parser(
        "demo",
        help="the built-in end-to-end demo on SmolLM2-135M (offline, CPU; see `lssf-lightning demo --help`)",
        add_help=False,
    )

    commands.add_parser(
        "fit",
        help="fine-tune with LSSFCallback via LightningCLI (see `lssf-lightning fit --help`)",
        add_help=False,
    )
    return parser


def _run_subspace(args) -> None:
    import warnings

    from lssf_lightning.io.guard import check_output
    from lssf_lightning.subspace import EmptySubspaceWarning, SafetySubspace

    config = _subspace_config(args)
    inputs = [args.aligned, args.unaligned, config.calibration]
    check_output(args.output, inputs, overwrite=args.overwrite, directory=False)  # before any SVD
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptySubspaceWarning)  # an empty subspace file is never wanted
        subspace = SafetySubspace.from_weights(
            args.aligned, args.unaligned, config, allow_partial=args.allow_partial
        )
    path = subspace.save(args.output, overwrite=args.overwrite, inputs=inputs)
    print(subspace.summary(max_rows=0 if len(subspace) > 40 else None).splitlines()[-1])
    print(f"saved {path}")


def _run_realign(args) -> None:
    from lssf_lightning.io.lora_export import realign_as_adapter
    from lssf_lightning.realign import realign_checkpoint

    common = {
        "aligned": args.aligned,
        "unaligned": args.unaligned,
        "subspace": args.subspace,
        "config": _subspace_config(args),
        "method": args.method,
        "alpha": args.alpha,
        "method_options": {"add": args.add, "input_share": args.input_share},  # the LSSF forms' own
        "overwrite": args.overwrite,
        "allow_partial": args.allow_partial,
    }
    if args.as_adapter:
        print(realign_as_adapter(args.finetuned, args.output, max_rank=args.adapter_max_rank, **common))
        return
    report = realign_checkpoint(
        args.finetuned,
        args.output,
        beta=args.beta,
        drop_rate=args.drop_rate,
        seed=args.seed,
        threshold=args.threshold,
        max_shard_bytes=args.max_shard_size,
        **common,
    )
    print(report)


def _run_inspect(args) -> None:
    from lssf_lightning.io.guard import check_output
    from lssf_lightning.subspace import SafetySubspace

    if args.plot:
        check_output(args.plot, [args.subspace], overwrite=args.overwrite, directory=False)
    subspace = SafetySubspace.load(args.subspace)
    print(subspace.summary(max_rows=None if args.all else 40))
    if args.plot:
        from lssf_lightning.plots import plot_subspace

        print(f"saved {plot_subspace(subspace, args.plot, overwrite=args.overwrite, inputs=[args.subspace])}")


def _run_sweep(argv: Sequence[str]) -> None:
    from lssf_lightning.sweep import main as sweep_main

    sweep_main(list(argv))


def _run_demo(argv: Sequence[str]) -> None:
    from lssf_lightning.demo.run import main as demo_main

    demo_main(list(argv))


def _run_fit(argv: Sequence[str]) -> None:
    from lssf_lightning.lightning.fit import run_fit_cli

    run_fit_cli(list(argv))


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's time limit), raised like Ctrl-C so the output guard cleans up."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit code is 0, 1 (an error, one line on stderr), 2 (usage), 130 (Ctrl-C) or
    143 (SIGTERM).

    Everything heavy is imported inside the runners, under :func:`_guarded`, so a Ctrl-C at any moment
    (also while torch is still being imported) ends in one line and exit code 130.
    """
    import signal
    import threading

    command = "lssf-lightning"
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
        delegated = {"fit": _run_fit, "demo": _run_demo, "sweep": _run_sweep}  # these parse their own options
        if argv[:1] and argv[0] in delegated:
            command = argv[0]
            return _guarded(lambda: delegated[argv[0]](argv[1:]), command)
        args = build_parser().parse_args(argv)
        command = args.command
        runner = {"subspace": _run_subspace, "realign": _run_realign, "inspect": _run_inspect}
        return _guarded(lambda: runner[args.command](args), command)
    except KeyboardInterrupt as err:  # while parsing, or between the steps above
        return _interrupted(command, err)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# Exception types that only a bug raises: reported as an internal error (still one line, with how to get
# more).
_BUGS = (KeyError, AttributeError, IndexError, AssertionError, NameError, ZeroDivisionError)


def _describe(err: BaseException) -> str:
    """One line for ``err``; an ``OSError`` names its path(s) and the system's reason."""
    if isinstance(err, OSError) and err.filename is not None:
        reason = err.strerror or str(err)
        target = f" -> {err.filename2}" if err.filename2 is not None else ""
        text = f"{err.filename}{target}: {reason}"
    elif isinstance(err, OSError) and err.strerror:
        text = err.strerror
    elif isinstance(err, MemoryError):
        text = f"out of memory{': ' + str(err) if str(err) else ''}"
    elif isinstance(err, re.error):
        text = f"invalid regular expression {err.pattern!r}: {err}"
    else:
        text = str(err) or type(err).__name__
    text = " ".join(text.split()).replace("overwrite=True / --overwrite", "--overwrite")  # CLI wording
    if isinstance(err, _BUGS):
        return (
            f"internal error ({type(err).__name__}: {text}); rerun with LSSF_LIGHTNING_DEBUG=1 for the "
            "traceback and please report it"
        )
    return text


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """One line per warning; only this package's own are labelled ``lssf-lightning: warning:``, others name
    the library that raised them (Lightning's, transformers' …)."""
    text = " ".join(str(message).split())
    parts = os.path.normpath(str(filename)).split(os.sep)
    if "lssf_lightning" in parts:
        print(f"lssf-lightning: warning: {text}", file=sys.stderr)
        return
    owner = parts[parts.index("site-packages") + 1] if "site-packages" in parts[:-1] else parts[-1]
    print(f"{owner}: {category.__name__}: {text}", file=sys.stderr)


def _interrupted(command: str, err: KeyboardInterrupt) -> int:
    what = "terminated" if isinstance(err, _Terminated) else "interrupted"
    print(
        f"{'lssf-lightning ' if command != 'lssf-lightning' else ''}{command}: {what}; no partial output was "
        "left behind",
        file=sys.stderr,
    )
    return 143 if isinstance(err, _Terminated) else 130


def _guarded(run: Callable[[], object], command: str) -> int:
    """Run ``run``; any error becomes one line on stderr and exit code 1 (``LSSF_LIGHTNING_DEBUG=1``:
    traceback)."""
    import warnings

    debug = bool(os.environ.get("LSSF_LIGHTNING_DEBUG"))
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _one_line_warning
            run()
    except KeyboardInterrupt as err:
        return _interrupted(command, err)
    except Exception as err:
        if debug:
            raise
        print(f"lssf-lightning {command}: error: {_describe(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
