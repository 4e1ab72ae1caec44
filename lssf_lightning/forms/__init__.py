"""The LSSF forms in a training run: :mod:`.applied` holds the math on live weights (corrections tracked as
rank-``k`` factors, so applications never stack); :mod:`.live` is what a callback runs (checkpoint fusion
with an exact resume, live applications, the guard on a LoRA model, the auto choice's candidates);
:mod:`.lora` what every other form needs on a peft LoRA model (the merged weight it reads:
``base + s·B·A``)."""

from lssf_lightning.forms.applied import (
    APPLY_ON_FORMS,
    CORRECTIONS_KEY,
    AppliedForms,
    CoordinateForms,
    check_form_settings,
    check_method_options,
    correction_product,
    low_rank_methods,
    make_low_rank_planner,
    unfuse,
    uses_forms,
)
from lssf_lightning.forms.live import (
    Candidates,
    LiveForms,
    LoraHoldOut,
    MissingCorrection,
    hold_out_lora_,
    lora_b_weights,
    restore_raw,
    run_form,
    temporarily_raw,
)

__all__ = [
    "APPLY_ON_FORMS",
    "CORRECTIONS_KEY",
    "AppliedForms",
    "Candidates",
    "CoordinateForms",
    "LiveForms",
    "LoraHoldOut",
    "MissingCorrection",
    "check_form_settings",
    "check_method_options",
    "correction_product",
    "hold_out_lora_",
    "lora_b_weights",
    "low_rank_methods",
    "make_low_rank_planner",
    "restore_raw",
    "run_form",
    "temporarily_raw",
    "unfuse",
    "uses_forms",
]
