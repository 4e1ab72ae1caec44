"""FSDP (full state dicts) on a GPU: realigned checkpoints, exact resume, export.

These run only where CUDA is available (CI has none): they are the check behind the README's FSDP row.
"""

import pytest
import torch
from conftest import state
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from test_callback import ROWS, EpochEndWeights, StartSnapshot, correction
from transformers import AutoModelForCausalLM

from lssf_lightning.lightning.callback import LSSFCallback
from lssf_lightning.lightning.data import ChatDataModule, write_chat_jsonl
from lssf_lightning.lightning.module import CausalLMModule

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs a CUDA device"),
]


def fsdp_fit(trio, train, callbacks, ckpt_path=None, max_epochs=2):
    torch.manual_seed(0)
    module = CausalLMModule(str(trio.aligned), learning_rate=1e-2)
    data = ChatDataModule(str(train), batch_size=4, shuffle=False)
    trainer = Trainer(
        accelerator="cuda",
        devices=1,
        strategy=FSDPStrategy(state_dict_type="full"),
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, module


def test_fsdp_checkpoint_is_realigned_and_resume_is_exact(llama_trio, tmp_path):
    train = write_chat_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "response": r} for p, r in ROWS])
    raw_at = EpochEndWeights()
    export = tmp_path / "export"
    callbacks = [
        LSSFCallback(unaligned=str(llama_trio.base), export_dir=str(export), verbose=False),
        raw_at,
        ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1, filename="{epoch}"),
    ]
    fsdp_fit(llama_trio, train, callbacks)
    saved = torch.load(tmp_path / "ck" / "epoch=0.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    key = "model.model.layers.0.self_attn.q_proj.weight"
    raw = raw_at.seen[0][key].cpu().double()
    assert torch.allclose(saved[key].double(), raw + correction(llama_trio, key), atol=1e-5)
    exported = state(AutoModelForCausalLM.from_pretrained(export))
    assert exported["model.layers.0.self_attn.q_proj.weight"].shape == saved[key].shape
    probe = StartSnapshot()
    fsdp_fit(
        llama_trio,
        train,
        [LSSFCallback(unaligned=str(llama_trio.base), verbose=False), probe],
        ckpt_path=tmp_path / "ck" / "epoch=0.ckpt",
    )
    assert torch.equal(probe.weights[key].cpu(), raw_at.seen[0][key].cpu())
