"""The commands of ``lssf-lightning``: build, apply and inspect safety subspaces; sweep; fine-tune; the demo.

    lssf-lightning subspace --aligned A --unaligned U --output S.safetensors [--eta 0.9 ...]
    lssf-lightning realign  --aligned A --unaligned U --finetuned F --output OUT [--method lssf|resta|...]
    lssf-lightning inspect  S.safetensors [--plot ranks.png]
    lssf-lightning sweep    --aligned A --unaligned U --finetuned F --output DIR [--lssf 0.5,1 --resta 1+0.9]
    lssf-lightning fit      --config configs/demo.yaml       (LightningCLI)
    lssf-lightning demo     [--quick] [--output DIR]

Errors print one line and exit non-zero; set ``LSSF_LIGHTNING_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lssf_lightning
from lssf_lightning.config import SOURCES, SVD_METHODS, SubspaceConfig
from lssf_lightning.io.guard import check_output
from lssf_lightning.io.layout import MAX_SHARD_BYTES
from lssf_lightning.io.shards import parse_shard_size
from lssf_lightning.methods.registry import METHODS, all_parameters, check_options, takers
from lssf_lightning.methods.spec import MethodSpec
from lssf_lightning.metrics import load_prompts
from lssf_lightning.metrics.perplexity import load_utility_texts
from lssf_lightning.plots import plot_subspace
from lssf_lightning.realign import realign_as_adapter, realign_checkpoint
from lssf_lightning.selection import SelectionRule
from lssf_lightning.subspace import EmptySubspaceWarning, SafetySubspace
from lssf_lightning.sweep import SweepGrid, sweep_checkpoints
from lssf_lightning.validation import SettingError, check_finite, check_int

__all__ = ["DELEGATED", "RUNNERS", "build_parser"]


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


def _shard_size(text: str) -> int:
    """``--max-shard-size``: ``2GB`` (10⁹), ``2GiB`` (2³⁰) or bytes, through ``huggingface_hub``'s parser."""
    try:
        return parse_shard_size(text, "--max-shard-size")
    except SettingError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _field_help() -> dict[str, str]:
    """Each :class:`SubspaceConfig` field's description, from its ``help`` metadata (the one place it is
    written), as plain text for argparse."""
    return {
        field.name: field.metadata["help"].replace("``", "").replace("%", "%%")
        for field in dataclasses.fields(SubspaceConfig)
        if "help" in field.metadata
    }


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


class _RegisteredMethods:
    """``--method``'s choices: a live view of :data:`~lssf_lightning.methods.registry.METHODS` (a method
    registered after the parser was built is accepted too)."""

    def __contains__(self, name: object) -> bool:
        return name in METHODS

    def __iter__(self):
        return iter(tuple(METHODS))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """``--method`` and one flag per declared method parameter (:mod:`lssf_lightning.methods.registry`): its
    range checked as it is parsed; which method takes it checked in :func:`_method_options`."""
    group = parser.add_argument_group("method (each flag belongs to the methods it names)")
    group.add_argument(
        "--method",
        default="lssf",
        choices=_RegisteredMethods(),
        metavar="METHOD",
        help="a registered realignment method: %(choices)s (default %(default)s)",
    )
    for name, param in all_parameters().items():
        convert = int if param.kind is int else float
        group.add_argument(
            param.flag,
            dest=name,
            type=_checked(lambda option, value, p=param: p.check(value, option), param.flag, convert),
            default=None,
            help=f"{param.help}; {param.interval} (default {param.default:g}; "
            f"{', '.join(takers(name))})".replace("%", "%%"),
        )


def _method_options(args) -> dict[str, Any]:
    """The method parameters given on the command line, refused (one line) when ``--method`` does not take
    them."""
    given = {name: getattr(args, name) for name in all_parameters() if getattr(args, name) is not None}
    check_options(args.method, given, spell=_flag)
    return given


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
    _add_method_options(real)
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


def _number_list(text: str) -> tuple[float, ...]:
    """``"0.25,0.5,1"`` → a tuple of finite numbers."""
    try:
        return tuple(check_finite("value", float(item)) for item in text.split(",") if item.strip())
    except (ValueError, SettingError) as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r} ({err})") from None


def _grid_items(spec: MethodSpec):
    """An argparse ``type`` for a method's sweep points: ``1,2+0.15`` (values of the method's parameters in
    their declared order, ``+`` between them; ``none``: no point), each checked against the declarations."""

    def parse(text: str) -> tuple[tuple[float, ...], ...]:
        if text.strip().lower() == "none":
            return ()
        items = []
        for item in (i.strip() for i in text.split(",") if i.strip()):
            try:
                values = tuple(float(v) for v in item.split("+"))
                spec.point(values)
            except ValueError as err:
                message = str(err) if isinstance(err, SettingError) else f"invalid item {item!r}"
                raise argparse.ArgumentTypeError(message) from None
            items.append(values)
        return tuple(items)

    parse.__name__ = f"--{spec.name}"
    return parse


def _grid_dest(method: str) -> str:
    return "grid_" + method.replace("-", "_")


def _add_sweep_grid(parser: argparse.ArgumentParser) -> None:
    """The sweep's grid flags: the subspaces, and one flag per registered method (from its declarations)."""
    grid = parser.add_argument_group("grid (per method: values of its parameters in order, '+' between them)")
    eta = SubspaceConfig().eta  # one default: realign's and the callbacks'
    grid.add_argument("--etas", type=_number_list, default=(eta,), help=f"subspace η values (default {eta})")
    grid.add_argument("--max-ranks", default="none",
                      help="rank caps, comma-separated; 'none' = no cap (default none)")
    grid.add_argument("--source", choices=SOURCES, default="weights",
                      help="subspace source (default weights)")
    for name, spec in METHODS.items():
        shown = ",".join("+".join(f"{v:g}" for v in values) for values in spec.grid) or "none"
        order = "+".join(spec.names) or "no parameters"
        lora = "; LoRA fine-tunes only" if spec.lora_only else ""
        grid.add_argument(f"--{name}", dest=_grid_dest(name), type=_grid_items(spec), default=None,
                          metavar="ITEMS",
                          help=f"{spec.help}: {order} items or 'none' (default {shown}{lora})")


def _add_sweep_options(parser: argparse.ArgumentParser) -> None:
    rule = SelectionRule()
    parser.add_argument("--finetuned", required=True,
                        help="fine-tuned HF directory or peft LoRA adapter directory")
    parser.add_argument("--aligned", required=True, help="aligned model (HF directory; the base of a LoRA)")
    parser.add_argument("--unaligned", required=True, help="unaligned counterpart (HF directory)")
    parser.add_argument("--output", required=True, help="directory for sweep.json and front.png")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output (only if it holds files lssf_lightning writes)")
    _add_sweep_grid(parser)
    data = parser.add_argument_group("validation data (never the test sets)")
    data.add_argument("--harmful",
                      help="harmful validation prompts (file); default the bundled calibration set")
    data.add_argument("--harmless", help="harmless prompts for over-refusal (file); default the bundled set")
    data.add_argument("--utility", default="stdlib", help="general text for perplexity: stdlib, bundled or a "
                      "file (default stdlib, validation half)")
    data.add_argument("--max-new-tokens", type=_checked(check_int, "--max-new-tokens", int), default=16,
                      help="tokens per answer (default 16)")
    choice = parser.add_argument_group("recommendation")
    choice.add_argument("--target-refusal", type=float,
                        help="refusal to reach (default: aligned − tolerance)")
    choice.add_argument("--refusal-tolerance", type=float, default=rule.refusal_tolerance,
                        help=f"default {rule.refusal_tolerance:g}")
    choice.add_argument("--max-perplexity-increase", type=float, default=rule.max_perplexity_increase,
                        help="utility budget over the fine-tuned model "
                        f"(default {rule.max_perplexity_increase:g} = +5%%)")
    choice.add_argument("--max-over-refusal-margin", type=float, default=rule.max_over_refusal_margin,
                        help=f"over-refusal allowed above the aligned model's "
                        f"(default {rule.max_over_refusal_margin:g})")
    choice.add_argument("--prefer", choices=("refusal", "utility"), default=rule.prefer,
                        help="among acceptable points reaching the target: the most refusal, or the lowest "
                        f"perplexity (default {rule.prefer})")


def build_parser() -> argparse.ArgumentParser:
    about = "Build, apply and inspect safety subspaces; sweep realignments; fine-tune with the callback."
    parser = _OneLineParser(prog="lssf-lightning", description=about)
    parser.add_argument("--version", action="version", version=f"%(prog)s {lssf_lightning.__version__}")
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

    sweep = commands.add_parser(
        "sweep",
        help="score a grid of realignments on validation prompts and general text, and recommend one",
        description="Score a grid of realignments on validation data (never the test sets) and recommend "
        "the setting that reaches the refusal target within the utility budget; writes sweep.json and "
        "front.png.",
    )
    _add_sweep_options(sweep)

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
    common = {
        "aligned": args.aligned,
        "unaligned": args.unaligned,
        "subspace": args.subspace,
        "config": _subspace_config(args),
        "method": args.method,
        **_method_options(args),
        "overwrite": args.overwrite,
        "allow_partial": args.allow_partial,
    }
    if args.as_adapter:
        print(realign_as_adapter(args.finetuned, args.output, max_rank=args.adapter_max_rank, **common))
        return
    report = realign_checkpoint(args.finetuned, args.output, max_shard_bytes=args.max_shard_size, **common)
    print(report)


def _run_inspect(args) -> None:
    if args.plot:
        check_output(args.plot, [args.subspace], overwrite=args.overwrite, directory=False)
    subspace = SafetySubspace.load(args.subspace)
    print(subspace.summary(max_rows=None if args.all else 40))
    if args.plot:
        print(f"saved {plot_subspace(subspace, args.plot, overwrite=args.overwrite, inputs=[args.subspace])}")


def _run_sweep(args) -> None:
    caps = [None if c.strip().lower() == "none" else int(c) for c in args.max_ranks.split(",")]
    subspaces = tuple(
        SubspaceConfig(eta=eta, max_rank=cap, source=args.source) for eta in args.etas for cap in caps
    )
    rule = SelectionRule(args.target_refusal, args.refusal_tolerance, args.max_perplexity_increase,
                         args.max_over_refusal_margin, None, args.prefer)
    given = {name: getattr(args, _grid_dest(name)) for name in METHODS}
    grid = SweepGrid(subspaces, {name: spec.grid if given[name] is None else given[name]
                                 for name, spec in METHODS.items()})
    # The files read are inputs; bundled set names are not paths.
    data_files = [f for f in (args.harmful, args.harmless, args.utility) if f and os.path.lexists(f)]
    check_output(args.output, [args.finetuned, args.aligned, args.unaligned, data_files],
                 overwrite=args.overwrite)  # before reading anything
    sweep_checkpoints(
        args.finetuned, args.aligned, args.unaligned, args.output, grid=grid, rule=rule,
        harmful={"harmful": load_prompts(args.harmful)} if args.harmful else None,
        harmless=load_prompts(args.harmless) if args.harmless else None,
        utility_texts=load_utility_texts(args.utility, "validation"), max_new_tokens=args.max_new_tokens,
        overwrite=args.overwrite, data_files=data_files,
    )


def _run_demo(argv: Sequence[str]) -> None:
    from lssf_lightning.demo.run import main as demo_main

    demo_main(list(argv))


def _run_fit(argv: Sequence[str]) -> None:
    from lssf_lightning.lightning.fit import run_fit_cli

    run_fit_cli(list(argv))


RUNNERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "subspace": _run_subspace, "realign": _run_realign, "inspect": _run_inspect, "sweep": _run_sweep,
}
"""The commands ``build_parser`` parses, by name."""

DELEGATED: dict[str, Callable[[Sequence[str]], None]] = {"fit": _run_fit, "demo": _run_demo}
"""The commands that parse their own options (LightningCLI, the demo), by name."""
