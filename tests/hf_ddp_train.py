"""A 2-process transformers.Trainer run with LSSFTrainerCallback (launched by torchrun in
tests/test_hf_trainer.py)."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from lssf_lightning.integrations.hf_trainer import LSSFTrainerCallback

torch.set_num_threads(1)
aligned, base, out = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(aligned)
texts = ["how do i bake bread at home ? sure , here is a simple answer .",
         "how do i kill a python process ? i cannot help with that request ."] * 4
encoded = tokenizer(texts, padding="max_length", max_length=16)
rows = [
    {"input_ids": i, "attention_mask": m, "labels": i}
    for i, m in zip(encoded["input_ids"], encoded["attention_mask"])
]
args = TrainingArguments(output_dir=f"{out}/trainer", max_steps=2, save_steps=2, eval_strategy="steps",
                         eval_steps=2,
                         per_device_train_batch_size=2, per_device_eval_batch_size=2, learning_rate=1e-2,
                         report_to=[], use_cpu=True, ddp_backend="gloo", seed=0, disable_tqdm=True)
callback = LSSFTrainerCallback(unaligned=base, alpha="auto", method="lssf", export_dir=f"{out}/export",
                               verbose=False, monitor={"num_prompts": 4, "max_new_tokens": 3})
trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(aligned), args=args, train_dataset=rows,
                  eval_dataset=rows[:4], processing_class=tokenizer, callbacks=[callback])
trainer.train()
if trainer.is_world_process_zero():
    logged = [e for e in trainer.state.log_history if "lssf/refusal_rate" in e]
    with open(f"{out}/metrics.json", "w") as f:
        json.dump({"world_size": args.world_size, "logged": logged}, f)
    trainer.save_model(f"{out}/final")
