"""The safety–utility sweep: score a grid of realignments on validation data (the grid, runner, scorer).

Every point of the grid is one registered method (:mod:`lssf_lightning.methods.registry`) with one setting of
its declared parameters, applied temporarily to the live fine-tuned model: the edit is made in place, the
model is scored (harmful refusal, over-refusal, perplexity on general text, optionally a task metric), and
the exact raw weights are put back. Each safety subspace is built once and reused by every point that uses
it. The grid (:class:`SweepGrid`) defaults to each method's declared sweep points, so a newly registered
method is swept without touching this module.

The choice among the scored points is :func:`lssf_lightning.selection.recommend` (the rule ``alpha="auto"``
uses too); when no point reaches the refusal target within the budget, nothing is recommended and the report
says "target not reached" with the best point of each side. Validation prompts and utility texts only: test
sets are never part of a sweep.
"""

from __future__ import annotations

import copy
import os
import shlex
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lssf_lightning.config import SubspaceConfig
from lssf_lightning.io.guard import guarded_output, write_json
from lssf_lightning.io.lora import is_adapter_dir
from lssf_lightning.io.weights import find_safetensors
from lssf_lightning.methods.base import temporarily_edited
from lssf_lightning.methods.registry import METHODS, make_planner
from lssf_lightning.methods.spec import MethodInputs, MethodSpec
from lssf_lightning.metrics import generate_responses, load_prompts, resolve_judge
from lssf_lightning.metrics.perplexity import load_utility_texts, model_perplexity
from lssf_lightning.plots import plot_front
from lssf_lightning.selection import Recommendation, SelectionRule, SweepPoint, describe, recommend
from lssf_lightning.subspace import SafetySubspace

__all__ = [
    "Candidate",
    "apply_command",
    "SweepGrid",
    "ValidationScorer",
    "grid_candidates",
    "run_sweep",
    "sweep_checkpoints",
    "sweep_report",
]


# -- running a grid ------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One grid point: a method name, its settings, and how to make its planner (called when scored).

    ``group`` names what the point shares with others (e.g. its safety subspace), for the cost report.
    """

    method: str
    params: Mapping[str, Any]
    planner: Callable[[], Any]
    group: str = ""


def run_sweep(
    model: nn.Module,
    candidates: Iterable[Candidate],
    score: Callable[[nn.Module], Mapping[str, Any]],
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[SweepPoint]:
    """Score every candidate on ``model`` (edited in place, restored exactly after each).

    Args:
        model: the fine-tuned model (HF or peft).
        candidates: the grid, consumed one point at a time (a generator is fine: subspaces can be built
            lazily between points; give it a ``len`` for the progress bar's total).
        score: ``model ↦ {"harmful_refusal", "harmless_refusal", "perplexity", "task_accuracy", ...}``;
            keys beyond those go to the point's ``extra``.
        progress: a progress bar over the grid.
        log: called with one line per scored point.
    """
    from tqdm.auto import tqdm

    total = len(candidates) if hasattr(candidates, "__len__") else None
    points = []
    bar = tqdm(candidates, total=total, desc="sweep", unit="point", disable=not progress)
    for candidate in bar:
        bar.set_postfix_str(f"{candidate.method} {dict(candidate.params)}", refresh=False)
        started = time.perf_counter()
        with temporarily_edited(model, candidate.planner()):
            scores = dict(score(model))
        seconds = time.perf_counter() - started
        point = SweepPoint.from_scores(candidate.method, candidate.params, scores, seconds)
        points.append(point)
        if log:
            log(describe(point))
    return points


def score_point(method: str, params: Mapping[str, Any], model: nn.Module, score) -> SweepPoint:
    """Score ``model`` as it is (e.g. the fine-tuned or the aligned model) into a :class:`SweepPoint`."""
    started = time.perf_counter()
    scores = dict(score(model))
    return SweepPoint.from_scores(method, params, scores, time.perf_counter() - started)



class ValidationScorer:
    """Scores a model on validation data: pooled harmful refusal, over-refusal, perplexity, extra metrics.

    Generation runs greedily on a copy in ``dtype`` (``None``: the model as it is); perplexity on the same
    copy.

    Args:
        tokenizer: the model's tokenizer (with its chat template).
        harmful: ``{set name: prompts}`` whose refusals are pooled into ``harmful_refusal`` (and reported one
            by one as ``harmful_refusal_<name>``).
        harmless: prompts whose refusal rate is the over-refusal.
        utility_texts: general texts for the perplexity (see :mod:`lssf_lightning.metrics.perplexity`).
        extra: ``{name: model ↦ float}`` further metrics (e.g. a task's accuracy as ``"task_accuracy"``).
        judge: refusal judge (see :func:`lssf_lightning.metrics.resolve_judge`).
        max_new_tokens: tokens generated per answer.
        batch_size: prompts per generation batch.
        dtype: evaluation dtype.
    """

    def __init__(
        self,
        tokenizer,
        harmful: Mapping[str, Sequence[str]],
        harmless: Sequence[str] | None = None,
        utility_texts: Sequence[str] | None = None,
        *,
        extra: Mapping[str, Callable[[nn.Module], float]] | None = None,
        judge=None,
        max_new_tokens: int = 16,
        batch_size: int = 32,
        dtype: torch.dtype | None = torch.bfloat16,
    ) -> None:
        self.tokenizer = tokenizer
        self.harmful = {name: list(prompts) for name, prompts in harmful.items() if prompts}
        if not self.harmful:
            raise ValueError("ValidationScorer needs at least one harmful prompt")
        self.harmless = list(harmless or [])
        self.utility_texts = list(utility_texts or [])
        self.extra = dict(extra or {})
        self.judge = resolve_judge(judge)
        self.max_new_tokens, self.batch_size, self.dtype = max_new_tokens, batch_size, dtype

    def _copy(self, model: nn.Module) -> nn.Module:
        parameter = next(model.parameters())
        if self.dtype is None or parameter.dtype == self.dtype:
            return model
        return copy.deepcopy(model).to(self.dtype)

    def _refusal(self, model: nn.Module, prompts: Sequence[str]) -> tuple[int, int]:
        answers = generate_responses(model, self.tokenizer, list(prompts), max_new_tokens=self.max_new_tokens,
                                     batch_size=self.batch_size)
        return sum(bool(v) for v in self.judge(answers)), len(answers)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        evaluated = self._copy(model)
        scores: dict[str, float] = {}
        refused = total = 0
        for name, prompts in self.harmful.items():
            count, size = self._refusal(evaluated, prompts)
            refused, total = refused + count, total + size
            scores[f"harmful_refusal_{name}"] = count / size
        scores["harmful_refusal"] = refused / total
        if self.harmless:
            count, size = self._refusal(evaluated, self.harmless)
            scores["harmless_refusal"] = count / size
        if self.utility_texts:
            scores["perplexity"] = model_perplexity(evaluated, self.tokenizer, self.utility_texts)
        for name, metric in self.extra.items():
            scores[name] = float(metric(evaluated))
        del evaluated
        return scores



def sweep_report(
    points: Sequence[SweepPoint],
    recommendation: Recommendation,
    *,
    reference: SweepPoint | None = None,
    aligned: SweepPoint | None = None,
    rule: SelectionRule | None = None,
    build_seconds: Mapping[str, float] | None = None,
    commands: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The JSON-ready sweep result: every point, the baselines, the rule, the cost, and ``"recommended"`` —
    or, when no point reaches the target within the budget, ``"target_not_reached"`` with the best point of
    each side instead (never both). ``commands``: the ``lssf-lightning realign`` line that applies each of
    those points (:func:`apply_command`), stored under the outcome's ``"apply"``."""
    scored = [p.seconds for p in points]
    builds = dict(build_seconds or {})
    total = sum(scored) + sum(builds.values())
    outcome = "recommended" if recommendation.recommended else "target_not_reached"
    chosen = recommendation.to_dict()
    if commands:
        chosen["apply"] = dict(commands)
    return {
        "points": [p.to_dict() for p in points],
        "reference": reference.to_dict() if reference else None,
        "aligned": aligned.to_dict() if aligned else None,
        "rule": asdict(rule or SelectionRule()),
        outcome: chosen,
        "cost": {
            "points": len(points),
            "seconds_scoring": round(sum(scored), 1),
            "seconds_building": {k: round(v, 1) for k, v in builds.items()},
            "seconds_per_point": round(total / max(len(points), 1), 2),
            "seconds_total": round(total, 1),
        },
    }


# -- the grid over checkpoints (``lssf-lightning sweep``) ----------------------------------------------------


@dataclass(frozen=True)
class SweepGrid:
    """What :func:`grid_candidates` evaluates.

    Args:
        subspaces: the safety subspaces (one :class:`~lssf_lightning.config.SubspaceConfig` each: ``η``,
            ``α₁``, rank cap, source); each is built once and shared by every point of a method that uses a
            subspace.
        points: ``{method: (values, ...)}``, each ``values`` a tuple for the method's first declared
            parameters (the rest keep their defaults), e.g. ``{"lssf-reset": ((1.0,), (2.0, 0.15))}`` for
            ``α = 1`` and ``α = 2, add = 0.15``; only the methods named are swept. ``None``: every registered
            method with its declared sweep points (:attr:`~lssf_lightning.methods.spec.MethodSpec.grid`).
    """

    subspaces: tuple = ()
    points: Mapping[str, tuple[tuple[float, ...], ...]] | None = None

    def methods(self, lora: bool = False) -> dict[str, tuple[MethodSpec, list[dict[str, Any]]]]:
        """``{name: (spec, [params, ...])}`` in registry order (``lora``: the LoRA-only methods too), each
        point checked against the method's declarations."""
        chosen = {name: spec.grid for name, spec in METHODS.items()} if self.points is None else self.points
        unknown = sorted(set(chosen) - set(METHODS))
        if unknown:
            raise ValueError(f"the sweep grid names unknown methods {unknown}; registered: {list(METHODS)}")
        return {
            name: (spec, [spec.point(tuple(values)) for values in chosen[name]])
            for name, spec in METHODS.items()
            if name in chosen and chosen[name] and (lora or not spec.lora_only)
        }

    def size(self, lora: bool = False) -> int:
        """Number of points (``lora``: the LoRA-only methods' too)."""
        per_subspace = max(len(self.subspaces), 1)
        return sum(len(params) * (per_subspace if spec.uses_subspace else 1)
                   for spec, params in self.methods(lora).values())


def _subspace_params(config) -> dict[str, Any]:
    """The settings of ``config`` that differ from the defaults (plus ``eta``), for point labels."""
    default = SubspaceConfig()
    params = {"eta": config.eta}
    for name in ("alpha_1", "max_rank", "source"):
        if getattr(config, name) != getattr(default, name):
            params[name] = getattr(config, name)
    return params


def _label_params(spec: MethodSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """The first parameter always, the others where they differ from their default (short labels)."""
    return {p.name: params[p.name] for i, p in enumerate(spec.parameters)
            if p.name in params and (i == 0 or params[p.name] != p.default)}


def _candidates(spec: MethodSpec, params_list, aligned, unaligned, subspace=None, prefix=None, group=""):
    for params in params_list:
        inputs = MethodInputs(None, aligned, unaligned, subspace, options=params, progress=False)
        yield Candidate(spec.name, {**(prefix or {}), **_label_params(spec, params)},
                        lambda name=spec.name, i=inputs: make_planner(name, i), group)


def grid_candidates(
    grid: SweepGrid,
    aligned,
    unaligned,
    *,
    lora: bool = False,
    tokenizer=None,
    build_seconds: dict[str, float] | None = None,
    prebuilt: Mapping[Any, Any] | None = None,
    progress: bool = False,
) -> Iterator[Candidate]:
    """The grid as candidates, in order: per subspace the points of the methods that use one (registry
    order), then the other methods' (the LoRA-only ones with ``lora``). Each subspace is built when its first
    point is reached (the time goes into ``build_seconds``) and dropped after its last, unless ``prebuilt``
    (``{SubspaceConfig: SafetySubspace}``, e.g. the callback's) already holds it."""
    methods = grid.methods(lora)
    timings = build_seconds if build_seconds is not None else {}
    with_subspace = [(spec, params) for spec, params in methods.values() if spec.uses_subspace]
    for config in (grid.subspaces or (SubspaceConfig(),)) if with_subspace else ():
        prefix = _subspace_params(config)
        name = SweepPoint("subspace", prefix, 0.0).label
        subspace = (prebuilt or {}).get(config)
        if subspace is None:
            started = time.perf_counter()
            subspace = SafetySubspace.from_weights(
                aligned, unaligned, config, tokenizer=tokenizer, progress=progress
            )
            timings[name] = time.perf_counter() - started
        for spec, params in with_subspace:
            yield from _candidates(spec, params, aligned, unaligned, subspace, prefix, name)
        del subspace
    for spec, params in methods.values():
        if not spec.uses_subspace:
            yield from _candidates(spec, params, aligned, unaligned)


def _number(value: Any) -> str:
    """A value as the command line spells it back exactly (``repr`` of a float round-trips)."""
    return repr(float(value)) if isinstance(value, float) else str(value)


def apply_command(point: SweepPoint, finetuned, aligned, unaligned, output: str | os.PathLike) -> str:
    """The ``lssf-lightning realign`` line that writes ``point``'s realigned model to ``output``: the same
    method, parameters and subspace settings (unstated ones are the same defaults the sweep used), so its
    weights equal the swept point's."""
    spec = METHODS[point.method]
    argv = ["lssf-lightning", "realign", "--finetuned", os.fspath(finetuned), "--aligned", os.fspath(aligned),
            "--unaligned", os.fspath(unaligned), "--method", point.method]
    for param in spec.parameters:
        if param.name in point.params:
            argv += [param.flag, _number(point.params[param.name])]
    if spec.uses_subspace:
        for name in ("eta", "alpha_1", "max_rank", "source"):
            if point.params.get(name) is not None:
                argv += ["--" + name.replace("_", "-"), _number(point.params[name])]
    return shlex.join([*argv, "--output", os.fspath(output)])


def _apply_commands(chosen: Recommendation, finetuned, aligned, unaligned) -> dict[str, str]:
    """The realign line of the recommended point, or (target not reached) of each side's best point."""
    output = f"{Path(os.fspath(finetuned)).name or 'model'}-realigned"
    named = ({"recommended": chosen.point} if chosen.recommended else
             {"safest_within_budget": chosen.safest, "cheapest_reaching_target": chosen.cheapest_reaching})
    return {name: apply_command(point, finetuned, aligned, unaligned, output)
            for name, point in named.items() if point is not None}


def _load_causal_lm(path: str, aligned: str, dtype):
    """A HF directory as a model, or a peft adapter directory on top of ``aligned``; ``(model, is_lora)``.

    Safetensors only, as everywhere in the package: a directory holding only pickled weights
    (``pytorch_model.bin``, ``adapter_model.bin``) is refused by :func:`find_safetensors` before transformers
    or peft could unpickle it."""
    from transformers import AutoModelForCausalLM

    def base_model(directory: str):
        find_safetensors(directory)
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True,
                                                    use_safetensors=True)

    if is_adapter_dir(path):
        from peft import PeftModel

        find_safetensors(path)
        base = base_model(aligned)
        return PeftModel.from_pretrained(base, path, use_safetensors=True).eval(), True
    return base_model(path).eval(), False


def sweep_checkpoints(
    finetuned: str,
    aligned: str,
    unaligned: str,
    output: str | Path,
    *,
    grid: SweepGrid | None = None,
    rule: SelectionRule | None = None,
    harmful: Mapping[str, Sequence[str]] | None = None,
    harmless: Sequence[str] | None = None,
    utility_texts: Sequence[str] | None = None,
    max_new_tokens: int = 16,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    overwrite: bool = False,
    data_files: Sequence[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Sweep ``grid`` on a fine-tuned checkpoint and write ``sweep.json`` and ``front.png`` into ``output``.

    ``output`` goes through the output guard (:mod:`lssf_lightning.io.guard`), checked and locked before any
    work: refused when it is, contains or lies inside an input (the three models, ``data_files``); an existing
    one is replaced only with ``overwrite`` and only if it holds files lssf_lightning writes; a second sweep
    into the same output fails at once on the lock.

    Args:
        finetuned: the fine-tuned HF directory or peft LoRA adapter directory (its base: ``aligned``).
        aligned: the aligned model directory.
        unaligned: its unaligned counterpart.
        output: directory for the results (created).
        grid: the settings; default :class:`SweepGrid` with the default :class:`SubspaceConfig` (the
            ``η`` that ``realign`` and the callbacks use).
        rule: the refusal target and utility budget; default :class:`SelectionRule`.
        harmful: ``{name: prompts}`` validation harmful sets; default the bundled ``harmful_calibration`` set
            (disjoint from the bundled evaluation set).
        harmless: over-refusal prompts; default the bundled ``harmless`` set.
        utility_texts: general text; default the validation half of the ``"stdlib"`` set.
        max_new_tokens: tokens generated per answer.
        progress: progress bars.
        log: called with one line per scored point.
        overwrite: replace an existing ``output``.
        data_files: the prompt and text files ``harmful``, ``harmless`` and ``utility_texts`` were read
            from (inputs the output must not overlap).

    Returns:
        The content of ``sweep.json`` (see :func:`sweep_report`).
    """
    inputs = [finetuned, aligned, unaligned, list(data_files)]
    with guarded_output(output, inputs, overwrite=overwrite) as staging:  # checked and locked before any work
        report = _sweep(finetuned, aligned, unaligned, staging, grid, rule, harmful, harmless, utility_texts,
                        max_new_tokens, progress, log)
    return report


def _sweep(finetuned, aligned, unaligned, output: Path, grid, rule, harmful, harmless, utility_texts,
           max_new_tokens, progress, log) -> dict[str, Any]:
    """:func:`sweep_checkpoints`' work, writing into the staging directory ``output``."""
    from transformers import AutoTokenizer

    grid = grid or SweepGrid(subspaces=(SubspaceConfig(),))
    rule = rule or SelectionRule()
    tokenizer = AutoTokenizer.from_pretrained(finetuned if Path(finetuned, "tokenizer_config.json").is_file()
                                              else aligned, local_files_only=True)
    score = ValidationScorer(
        tokenizer,
        harmful or {"calibration": load_prompts("harmful_calibration")},
        load_prompts("harmless") if harmless is None else harmless,
        load_utility_texts("stdlib", "validation") if utility_texts is None else utility_texts,
        max_new_tokens=max_new_tokens,
    )
    aligned_model, _ = _load_causal_lm(aligned, aligned, torch.float32)
    aligned_point = score_point("aligned", {}, aligned_model, score)
    del aligned_model
    model, lora = _load_causal_lm(finetuned, aligned, torch.float32)
    reference = score_point("finetuned", {}, model, score)
    if log:
        log(describe(aligned_point))
        log(describe(reference))
    builds: dict[str, float] = {}
    candidates = grid_candidates(
        grid, aligned, unaligned, lora=lora, tokenizer=tokenizer, build_seconds=builds
    )
    points = run_sweep(model, _Sized(candidates, grid.size(lora)), score, progress=progress, log=log)
    chosen = recommend(points, rule, reference=reference, aligned=aligned_point)
    commands = _apply_commands(chosen, finetuned, aligned, unaligned)
    report = sweep_report(points, chosen, reference=reference, aligned=aligned_point, rule=rule,
                          build_seconds=builds, commands=commands)
    plot_front(points, output / "front.png", reference=reference, aligned=aligned_point,
               recommended=chosen.point if chosen.recommended else None, limits=chosen.limits)
    write_json(output / "sweep.json", report)
    if log:
        log(str(chosen))
        for name, command in commands.items():
            log(f"to apply the {name.replace('_', ' ')} point: {command}")
    return report


class _Sized:
    """An iterable with a known length (so the progress bar shows a total while subspaces build lazily)."""

    def __init__(self, items: Iterable, length: int) -> None:
        self._items, self._length = items, length

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return self._length


