"""Realign an already fine-tuned Hugging Face model with the Python API (no Lightning involved).

    python examples/posthoc_realign.py ALIGNED_DIR UNALIGNED_DIR FINETUNED_DIR OUTPUT_DIR

The same as `lssf-lightning realign --aligned A --unaligned U --finetuned F --output OUT`, but showing the
pieces: the safety subspace is built once (rank-r factors only), saved, and fused into the fine-tuned model.
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

from lssf_lightning import SafetySubspace, SubspaceConfig
from lssf_lightning.methods import LSSF, apply_edits

aligned, unaligned, finetuned, output = sys.argv[1:5]

# streams both checkpoints tensor by tensor
subspace = SafetySubspace.from_weights(aligned, unaligned, config=SubspaceConfig(eta=0.9))
print(subspace.summary(max_rows=5))
subspace.save(f"{output}-subspace.safetensors")  # reusable for every fine-tune of the same aligned model

model = AutoModelForCausalLM.from_pretrained(finetuned)
apply_edits(model, LSSF(subspace, 1.0), inplace=True)  # W <- W + alpha * U'(U'^T delta), nothing else changes
model.save_pretrained(output)
AutoTokenizer.from_pretrained(finetuned).save_pretrained(output)
