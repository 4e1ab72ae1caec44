"""Fine-tune an aligned chat model and keep it safe: every checkpoint holds LSSF-realigned weights.

    python examples/finetune_with_callback.py ALIGNED_DIR UNALIGNED_DIR TRAIN.jsonl OUTPUT_DIR [--lora]

TRAIN.jsonl holds {"prompt": ..., "response": ...} rows. OUTPUT_DIR receives the checkpoints in
OUTPUT_DIR/checkpoints and, at the end, a realigned Hugging Face model in OUTPUT_DIR/realigned (an export may
not lie inside the checkpoint folder).
"""

import argparse

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lssf_lightning import CausalLMModule, ChatDataModule, LSSFCallback, SubspaceConfig

parser = argparse.ArgumentParser()
parser.add_argument("aligned"), parser.add_argument("unaligned"), parser.add_argument("train_file")
(
    parser.add_argument("output"),
    parser.add_argument("--lora", action="store_true"),
    parser.add_argument("--epochs", type=int, default=1),
)
args = parser.parse_args()

model = CausalLMModule(
    args.aligned, learning_rate=1e-4, lora={"r": 8, "lora_alpha": 16} if args.lora else None
)
data = ChatDataModule(train_file=args.train_file, batch_size=4, max_length=256)
safety = LSSFCallback(
    unaligned=args.unaligned,
    subspace=SubspaceConfig(eta=0.9),
    alpha=1.0,
    export_dir=f"{args.output}/realigned",
)
checkpoints = ModelCheckpoint(dirpath=f"{args.output}/checkpoints", save_last=True)
trainer = Trainer(max_epochs=args.epochs, callbacks=[safety, checkpoints])
trainer.fit(model, data)
print(safety.subspace.summary(max_rows=5))
