"""The demo's LoRA run written as peft LoRA adapters (the safety adapter and the combined adapter), scored
served unmerged, merged and at rank caps."""

from __future__ import annotations

import tempfile
from pathlib import Path

from lssf_lightning.adapters import write_model_adapter
from lssf_lightning.demo.state import Run, load_model, score_summary
from lssf_lightning.methods.base import temporarily_edited

__all__ = ["lora_adapters"]

def lora_adapters(run: Run, peft_model, merged, planner, evaluate, check, scores: dict) -> dict:
    """The LoRA run's realignment as peft LoRA adapters; returns their sizes and what serving them scores.

    Writes the *safety adapter* (the correction alone: onto the merged fine-tune, or stacked with the task
    adapter) and the *combined adapter* (task LoRA + correction: ONE adapter onto the aligned model, what a
    single-adapter LoRA server loads). The combined adapter is scored loaded with peft onto the aligned model:
    unmerged, as a LoRA server computes it (``scores["realigned_adapter"]``), and merged
    (``scores["realigned_adapter_merged"]``, to set beside the realigned model's ``scores["realigned"]``, with
    the largest weight difference); and merged at each of ``config.adapter_rank_caps``
    (``scores["realigned_adapter_r<cap>"]``: what the cap costs). The exact comparison is ``check(model)``
    (the refusal sets in float32) of the merged adapter against the realigned model: the same answers, the
    same refusal rates.
    ``planner`` makes the recommended fusion form; ``evaluate(model, name)`` scores a model on test.
    """
    from peft import PeftModel


    config, log = run.config, run.log
    with tempfile.TemporaryDirectory(prefix="lssf-demo-adapters-") as scratch:
        directory = run.output / "models" if config.save_models else Path(scratch)
        safety = write_model_adapter(merged, planner(), directory / "lora_safety_adapter", overwrite=True)
        combined = write_model_adapter(
            peft_model, planner(), directory / "lora_realigned_adapter", overwrite=True
        )
        log.info(f"safety adapter (onto the merged fine-tune): {safety}")
        log.info(f"combined adapter (task LoRA + correction, onto the aligned model): {combined}")
        served = PeftModel.from_pretrained(load_model(run.aligned_dir)[0], combined.directory).eval()
        scores["realigned_adapter"] = evaluate(served, "LoRA realigned, its combined adapter served unmerged")
        loaded = served.merge_and_unload()
        scores["realigned_adapter_merged"] = evaluate(loaded, "LoRA realigned, its combined adapter merged")
        with temporarily_edited(merged, planner()):  # the realigned model, for this block
            weight_error = _max_relative_difference(loaded, merged)
            exact = {"realigned": check(merged)}
        log.info(f"combined adapter merged by peft vs the realigned model: weights differ by at most "
                 f"{weight_error:.1e} (relative, per matrix)")
        exact["adapter"] = check(loaded)
        del served, loaded
        caps = {}
        for cap in config.adapter_rank_caps:
            capped = write_model_adapter(peft_model, planner(), Path(scratch) / f"r{cap}", max_rank=cap)
            aligned = load_model(run.aligned_dir)[0]
            model = PeftModel.from_pretrained(aligned, capped.directory).merge_and_unload()
            label = f"LoRA realigned, combined adapter rank ≤ {cap}"
            scores[f"realigned_adapter_r{cap}"] = evaluate(model, label)
            caps[str(cap)] = {k: v for k, v in capped.to_dict().items() if k != "directory"}  # not kept
            del model
    realigned = score_summary(scores["realigned"])

    def differences(name):
        other = score_summary(scores[name])
        return {k: [v, other.get(k)] for k, v in realigned.items() if other.get(k) != v}

    merged_differ, served_differ = differences("realigned_adapter_merged"), differences("realigned_adapter")
    rates = {name: score_summary(result) for name, result in exact.items()}
    answers = [(a["response"], b["response"]) for key in exact["realigned"]["responses"]
               for a, b in zip(exact["realigned"]["responses"][key], exact["adapter"]["responses"][key])]
    different = sum(a != b for a, b in answers)
    refusals_equal = rates["realigned"] == rates["adapter"]
    log.info(f"float32 check, combined adapter vs the realigned model: {different} of {len(answers)} "
             f"refusal-set answers differ; refusal rates {'equal' if refusals_equal else 'differ'} "
             f"({rates['adapter']})")
    log.info(f"bf16 test evaluation: merged adapter {merged_differ or 'the same scores'}; served unmerged "
             f"{served_differ or 'the same scores'} (against the realigned model)")
    return {"safety": safety.to_dict(), "combined": combined.to_dict(), "rank_caps": caps,
            "max_relative_weight_difference": weight_error,
            "float32_check": {"refusal_rates": rates, "different_answers": different,
                              "answers": len(answers)},
            "refusals_equal_merged": refusals_equal,
            "bf16_differences_merged": merged_differ, "bf16_differences_served_unmerged": served_differ}


def _max_relative_difference(model, reference) -> float:
    """The largest ``‖W_model − W_reference‖ / ‖W_reference‖`` over the 2-D parameters both have."""
    weights = dict(model.named_parameters())
    worst = 0.0
    for name, value in reference.named_parameters():
        if name in weights and value.ndim == 2:
            expected = value.detach().double()
            difference = (weights[name].detach().double() - expected).norm()
            worst = max(worst, float(difference / expected.norm().clamp_min(1e-30)))
    return worst
