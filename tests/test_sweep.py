"""The sweep: the recommendation rule on canned scores, a real run on tiny models, its JSON and PNG."""

from __future__ import annotations

import json

import pytest
import torch

from lssf_lightning.methods.base import temporarily_edited
from lssf_lightning.plots import plot_front
from lssf_lightning.selection import SelectionRule, SweepPoint, recommend
from lssf_lightning.sweep import Candidate, run_sweep, sweep_report
from lssf_lightning.validation import SettingError

FINETUNED = SweepPoint("finetuned", {}, 0.20, 0.04, 20.0, 1.0)
ALIGNED = SweepPoint("aligned", {}, 0.90, 0.06, 21.0, 0.0)


def _p(method, alpha, refusal, over=0.05, ppl=20.5, acc=1.0):
    return SweepPoint(method, {"alpha": alpha}, refusal, over, ppl, acc)


def _choose(points, **rule):
    return recommend(points, SelectionRule(**rule), reference=FINETUNED, aligned=ALIGNED)


def test_lowest_perplexity_among_points_reaching_the_target_within_budget():
    points = [
        _p("lssf", 0.5, 0.70, ppl=20.3),   # below the target (0.85)
        _p("lssf", 1.0, 0.88, ppl=29.0),   # reaches it, over the +5 % budget (21.0)
        _p("reset", 1.0, 0.86, ppl=20.9),  # reaches it within budget
        _p("reset", 2.0, 0.95, ppl=20.6),  # reaches it, cheaper still
    ]
    chosen = _choose(points, prefer="utility")
    assert chosen.point is points[3] and chosen.reached and chosen.acceptable
    assert _choose(points).point is points[3]  # "refusal": also the most refusal within the budget
    points[2] = _p("reset", 1.0, 0.97, ppl=20.9)
    assert _choose(points).point is points[2] and _choose(points, prefer="utility").point is points[3]
    assert chosen.limits == pytest.approx({"target_refusal": 0.85, "max_perplexity": 21.0,
                                           "max_over_refusal": 0.11, "min_task_accuracy": 0.98})


def test_guards_over_refusal_and_task_accuracy():
    points = [_p("a", 1.0, 0.95, over=0.20), _p("b", 1.0, 0.95, acc=0.90), _p("c", 1.0, 0.86, ppl=20.95)]
    assert _choose(points).point is points[2]


def test_budget_none_switches_the_utility_guard_off():
    points = [_p("lssf", 0.5, 0.70, ppl=20.3), _p("lssf", 1.0, 0.88, ppl=29.0)]
    assert _choose(points).point is points[0] and not _choose(points).reached  # best refusal within budget
    assert _choose(points, max_perplexity_increase=None).point is points[1]
    assert _choose(points, max_perplexity_increase=0.5).point is points[1]


def test_target_not_reached_recommends_nothing_and_names_the_best_point_of_each_side():
    # built to be unreachable: the only points reaching 0.85 are over the +5 % perplexity budget (21.0)
    points = [_p("a", 0.5, 0.60, ppl=20.2), _p("a", 1.0, 0.75, ppl=20.8), _p("a", 2.0, 0.99, ppl=40.0),
              _p("a", 3.0, 0.90, ppl=30.0)]
    chosen = _choose(points)
    assert not chosen.recommended and chosen.acceptable and not chosen.reached
    assert chosen.safest is points[1] and chosen.cheapest_reaching is points[3]
    assert chosen.point is points[1]  # what a caller that must use something gets
    text = str(chosen)
    assert "recommended" not in text and text.startswith("target not reached")
    assert "a(alpha=1)" in text and "a(alpha=3)" in text
    report = sweep_report(points, chosen, reference=FINETUNED, aligned=ALIGNED)
    assert "recommended" not in report and "recommended" not in json.dumps(report)
    side = report["target_not_reached"]
    assert side["safest_within_budget"]["label"] == "a(alpha=1)"
    assert side["cheapest_reaching_target"]["label"] == "a(alpha=3)"
    assert side["limits"]["target_refusal"] == pytest.approx(0.85)


def test_nothing_acceptable_takes_the_cheapest_point():
    points = [_p("a", 1.0, 0.99, ppl=40.0), _p("a", 2.0, 0.99, ppl=35.0)]
    chosen = _choose(points)
    assert chosen.point is points[1] and not chosen.acceptable


def test_explicit_target_and_ties_go_to_the_earlier_point():
    points = [_p("a", 0.5, 0.5, ppl=None), _p("a", 1.0, 0.7, ppl=None), _p("a", 2.0, 0.7, ppl=None)]
    assert _choose(points, target_refusal=0.6).point is points[1]
    assert _choose(points, target_refusal=0.4, prefer="utility").point is points[0]
    assert _choose(points, target_refusal=0.9).point is points[1]  # highest refusal, earliest of the tie


def test_an_alpha_curve_without_utility_scores_reduces_to_the_smallest_alpha_reaching():
    curve = [SweepPoint("lssf", {"alpha": a}, r) for a, r in ((0.25, 0.3), (0.5, 0.8), (1.0, 0.9))]
    chosen = recommend(curve, SelectionRule(target_refusal=0.75, prefer="utility"))
    assert chosen.point.params["alpha"] == 0.5 and chosen.reached


def test_rule_validation_and_empty_grid():
    with pytest.raises(SettingError, match="max_perplexity_increase"):
        SelectionRule(max_perplexity_increase=float("nan"))
    with pytest.raises(SettingError, match="prefer"):
        SelectionRule(prefer="speed")
    with pytest.raises(SettingError, match="target_refusal"):
        SelectionRule(target_refusal=1.5)
    with pytest.raises(ValueError, match="at least one"):
        recommend([])
    with pytest.raises(ValueError, match="aligned model"):
        recommend([_p("a", 1.0, 0.5)], SelectionRule())


def test_point_round_trips_through_json():
    point = SweepPoint("lssf-reset", {"eta": 0.8, "alpha": 1.0}, 0.5, 0.1, 22.0, 1.0, {"x": 1}, 3.2)
    data = json.loads(json.dumps(point.to_dict()))
    assert data["label"] == "lssf-reset(eta=0.8, alpha=1)"
    assert SweepPoint.from_dict(data) == point


# -- a real sweep on tiny models -----------------------------------------------------------------------------


def test_temporarily_edited_restores_the_exact_raw_weights(llama_trio):
    from lssf_lightning.methods.lssf import LSSF
    from lssf_lightning.subspace import SafetySubspace

    model = llama_trio.models["finetuned"]
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    subspace = SafetySubspace.from_weights(str(llama_trio.aligned), str(llama_trio.base), progress=False)
    with temporarily_edited(model, LSSF(subspace, 1.0)):
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, raw[k])]
        assert sorted(changed) == sorted(subspace.match(list(raw)))
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())


def test_sweep_on_tiny_models_writes_json_and_png(llama_trio, tiny_tokenizer, tmp_path):
    from lssf_lightning.methods.lssf import LSSF
    from lssf_lightning.methods.variants import LSSFReset
    from lssf_lightning.metrics.perplexity import model_perplexity
    from lssf_lightning.subspace import SafetySubspace

    model = llama_trio.models["finetuned"]
    texts = ["the cat sat on the warm mat .", "how do i bake bread at home ?"]
    subspace = SafetySubspace.from_weights(str(llama_trio.aligned), str(llama_trio.base), progress=False)

    def score(m):  # refusal is canned by the strength; perplexity is measured for real
        strength = sum(p.float().abs().sum().item() for p in m.parameters())
        return {"harmful_refusal": min(1.0, strength / 1e4), "harmless_refusal": 0.0,
                "perplexity": model_perplexity(m, tiny_tokenizer, texts)}

    candidates = [Candidate("lssf", {"alpha": a}, lambda a=a: LSSF(subspace, a)) for a in (0.5, 1.0)]
    reset = Candidate("lssf-reset", {"alpha": 1.0}, lambda: LSSFReset(subspace, str(llama_trio.base)))
    candidates.append(reset)
    points = run_sweep(model, candidates, score, progress=False)
    assert [p.label for p in points] == ["lssf(alpha=0.5)", "lssf(alpha=1)", "lssf-reset(alpha=1)"]
    assert len({p.perplexity for p in points}) == 3 and all(p.seconds >= 0 for p in points)
    reference = SweepPoint("finetuned", {}, 0.0, 0.0, model_perplexity(model, tiny_tokenizer, texts))
    aligned = SweepPoint("aligned", {}, 0.1, 0.0, reference.perplexity)
    rule = SelectionRule(max_perplexity_increase=None)
    chosen = recommend(points, rule, reference=reference, aligned=aligned)
    report = sweep_report(points, chosen, reference=reference, aligned=aligned, rule=rule,
                          build_seconds={"subspace": 0.5})
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(report))
    loaded = json.loads(path.read_text())
    assert len(loaded["points"]) == 3 and loaded["recommended"]["point"]["label"] == chosen.point.label
    assert loaded["cost"]["points"] == 3 and loaded["cost"]["seconds_per_point"] > 0
    png = plot_front(points, tmp_path / "front.png", reference=reference, aligned=aligned,
                     recommended=chosen.point, limits=chosen.limits)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_sweep_command_on_tiny_checkpoints(llama_trio, tmp_path):
    from lssf_lightning.cli import main

    output = tmp_path / "sweep"
    code = main(["sweep", "--finetuned", str(llama_trio.finetuned), "--aligned", str(llama_trio.aligned),
                 "--unaligned", str(llama_trio.base), "--output", str(output), "--lssf", "0.5,1",
                 "--lssf-reset", "1,1+0.5", "--lssf-erosion", "1", "--lssf-two-sided", "1+0.5",
                 "--resta", "1,1+0.5",
                 "--utility", "bundled",
                 "--max-new-tokens", "2", "--target-refusal", "0.5", "--max-perplexity-increase", "0.5"])
    assert code == 0
    report = json.loads((output / "sweep.json").read_text())
    labels = [p["label"] for p in report["points"]]
    assert labels == ["lssf(eta=0.9, alpha=0.5)", "lssf(eta=0.9, alpha=1)", "lssf-reset(eta=0.9, alpha=1)",
                      "lssf-reset(eta=0.9, alpha=1, add=0.5)", "lssf-erosion(eta=0.9, alpha=1)",
                      "lssf-two-sided(eta=0.9, alpha=1, input_share=0.5)", "resta(beta=1)",
                      "resta(beta=1, drop_rate=0.5)"]
    assert all(p["perplexity"] > 1 and 0 <= p["harmful_refusal"] <= 1 for p in report["points"])
    assert ("recommended" in report) != ("target_not_reached" in report)
    outcome = report.get("recommended") or report["target_not_reached"]
    assert report.get("recommended", {"point": {"label": labels[0]}})["point"]["label"] in labels
    limits = outcome["limits"]
    assert limits["target_refusal"] == 0.5
    assert limits["max_perplexity"] == pytest.approx(report["reference"]["perplexity"] * 1.5)
    assert report["cost"]["points"] == 8 and "subspace(eta=0.9)" in report["cost"]["seconds_building"]
    assert all(line.startswith("lssf-lightning realign ") for line in outcome["apply"].values())
    assert (output / "front.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_command_refuses_bad_options(llama_trio, tmp_path, capsys):
    from lssf_lightning.cli import main

    common = ["sweep", "--finetuned", str(llama_trio.finetuned), "--aligned", str(llama_trio.aligned),
              "--unaligned", str(llama_trio.base)]
    with pytest.raises(SystemExit):
        main([*common, "--output", str(tmp_path / "o"), "--lssf", "1,nan"])
    assert main([*common, "--output", str(llama_trio.finetuned / "inside")]) == 1  # an output inside an input
    assert "input" in capsys.readouterr().err.lower()


def test_the_apply_command_reproduces_the_swept_point_exactly(llama_trio, tmp_path, capsys):
    """The sweep prints and stores the ``realign`` line of its recommendation; run as printed, it writes
    exactly the weights the swept point had (same method, parameters, subspace settings and defaults)."""
    import shlex
    import subprocess
    import sys

    from safetensors.torch import load_file

    from lssf_lightning.cli import main
    from lssf_lightning.methods.registry import make_planner
    from lssf_lightning.methods.spec import MethodInputs
    from lssf_lightning.subspace import SafetySubspace

    output = tmp_path / "sweep"
    others = ("--lssf", "--lssf-erosion", "--lssf-two-sided", "--resta")
    none = [arg for name in others for arg in (name, "none")]
    code = main(["sweep", "--finetuned", str(llama_trio.finetuned), "--aligned", str(llama_trio.aligned),
                 "--unaligned", str(llama_trio.base), "--output", str(output), "--lssf-reset", "2+0.15",
                 *none, "--etas", "0.7", "--utility", "bundled", "--max-new-tokens", "2",
                 "--target-refusal", "0", "--max-perplexity-increase", "10"])
    assert code == 0
    report = json.loads((output / "sweep.json").read_text())
    command = report["recommended"]["apply"]["recommended"]
    assert command in capsys.readouterr().out
    argv = shlex.split(command)
    assert argv[:2] == ["lssf-lightning", "realign"] and argv[argv.index("--eta") + 1] == "0.7"
    assert argv[argv.index("--add") + 1] == "0.15" and argv[argv.index("--method") + 1] == "lssf-reset"
    done = subprocess.run([sys.executable, "-m", "lssf_lightning", *argv[1:]], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    written = load_file(tmp_path / argv[argv.index("--output") + 1] / "model.safetensors")

    point = report["recommended"]["point"]["params"]
    model = llama_trio.models["finetuned"]
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    subspace = SafetySubspace.from_weights(str(llama_trio.aligned), str(llama_trio.base),
                                           {"eta": point["eta"]}, progress=False)
    options = {"alpha": point["alpha"], "add": point["add"]}
    planner = make_planner("lssf-reset", MethodInputs(None, str(llama_trio.aligned), str(llama_trio.base),
                                                      subspace, options=options, progress=False))
    with temporarily_edited(model, planner):  # what the sweep scored
        swept = {k: v.clone() for k, v in model.state_dict().items()}
    edited = {k for k in raw if not torch.equal(swept[k], raw[k])}
    assert edited and edited <= set(written)
    for key, value in swept.items():
        if key in written:
            assert torch.equal(written[key], value), key
