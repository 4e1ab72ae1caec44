import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lssf_lightning.lightning.data import write_chat_jsonl
from lssf_lightning.training import RAW_FIXUPS_KEY

SCRIPT = Path(__file__).with_name("ddp_fit.py")
# Rows with equal numbers of labelled tokens, trained full-batch: the mean of the two per-rank losses equals
# the single-process loss over the same 8 rows.
ROW_A = {"prompt": "how do i bake bread at home ?", "response": "sure , here is a simple answer ."}
ROW_B = {"prompt": "what is the capital of france ?", "response": "please i cannot help with that request ."}


def run(trio, train, out, devices):
    command = [sys.executable, str(SCRIPT), str(trio.aligned), str(trio.base), str(train), str(out),
               str(devices)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(out / "final.ckpt", map_location="cpu", weights_only=False)
    return checkpoint, json.loads((out / "metrics.json").read_text())


def test_ddp_with_two_processes_writes_the_same_checkpoint_as_one(llama_trio, tmp_path):
    train = write_chat_jsonl(tmp_path / "train.jsonl", [ROW_A, ROW_B] * 4)
    single, single_metrics = run(llama_trio, train, tmp_path / "one", 1)
    ddp, ddp_metrics = run(llama_trio, train, tmp_path / "two", 2)
    assert single["global_step"] == ddp["global_step"] == 3
    for key, value in single["state_dict"].items():
        assert torch.allclose(ddp["state_dict"][key], value, atol=1e-5), key
    assert ddp[RAW_FIXUPS_KEY].keys() == single[RAW_FIXUPS_KEY].keys() and len(single[RAW_FIXUPS_KEY]) == 14
    assert ddp["lssf"]["alpha_added"] == single["lssf"]["alpha_added"] == 1.0
    assert ddp_metrics.keys() == single_metrics.keys()
    rates = [k for k in single_metrics if "refusal_rate" in k]
    assert len(rates) == 4 and {k: ddp_metrics[k] for k in rates} == {k: single_metrics[k] for k in rates}
    for key in set(single_metrics) - set(rates):  # the monitor's utility numbers (perplexity), not discrete
        assert ddp_metrics[key] == pytest.approx(single_metrics[key], rel=1e-4), key
