"""``lssf-lightning fit``: the shipped configs parse, and run end to end with tiny substitutes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lssf_lightning.lightning.data import write_chat_jsonl
from lssf_lightning.training import RAW_FIXUPS_KEY

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = ["llama-3.1-8b-instruct_lora.yaml", "qwen2.5-7b-instruct_lora.yaml"]


def fit_cli(*args, cwd=None):
    done = subprocess.run([sys.executable, "-m", "lssf_lightning.cli", "fit", *map(str, args)],
                          check=False, capture_output=True, text=True, cwd=cwd, timeout=600)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_parse_with_the_papers_settings(name, llama_trio):
    code, stdout, stderr = fit_cli("--config", CONFIGS / name, "--model.model", llama_trio.aligned,
                                   "--print_config")
    assert code == 0, stderr
    config = yaml.safe_load(stdout)
    assert config["model"]["lora"]["r"] == 16 and config["model"]["learning_rate"] == 1e-5
    assert config["model"]["model"] == str(llama_trio.aligned)
    lssf = next(c for c in config["trainer"]["callbacks"] if c["class_path"] == "lssf_lightning.LSSFCallback")
    assert lssf["init_args"]["apply_on"] == "checkpoint" and lssf["init_args"]["subspace"]["eta"] == 0.9
    assert lssf["init_args"]["monitor"]["init_args"]["num_prompts"] == 32


def substitute(config_name, replacements, tmp_path):
    text = (CONFIGS / config_name).read_text()
    for old, new in replacements.items():
        text = text.replace(old, str(new))
    path = tmp_path / config_name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    rows = [{"prompt": "what is the capital of france ?", "response": "the capital of france is ."},
            {"prompt": "tell me a fun fact about space .", "response": "sure , here is a fun fact ."}] * 4
    return write_chat_jsonl(root / "train.jsonl", rows), write_chat_jsonl(root / "val.jsonl", rows[:2])


def test_paper_config_runs_a_few_steps_with_tiny_substitutes(llama_trio, task_data, tmp_path):
    config = substitute("llama-3.1-8b-instruct_lora.yaml", {
        "/models/Llama-3.1-8B-Instruct": llama_trio.aligned, "/models/Llama-3.1-8B": llama_trio.base,
        "data/agnews_train.jsonl": task_data[0], "data/agnews_val.jsonl": task_data[1],
        "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]": "[q_proj, v_proj]",
        "num_prompts: 32":
            "num_prompts: 2\n          judge: lssf_lightning.metrics.judges.RefusalPhraseJudge",
    }, tmp_path)
    code, _, stderr = fit_cli("--config", config, "--trainer.accelerator=cpu", "--trainer.precision=32-true",
                              "--model.dtype=float32", "--trainer.max_epochs=2", "--trainer.max_steps=2",
                              cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoints/llama-3.1-8b-instruct-lora/last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2 and len(checkpoint[RAW_FIXUPS_KEY]) == 14
    AutoModelForCausalLM.from_pretrained(tmp_path / "exports/llama-3.1-8b-instruct-lssf")
    assert (tmp_path / "checkpoints/llama-3.1-8b-safety.safetensors").is_file()


def test_demo_config_runs_a_few_steps(llama_trio, task_data, tmp_path):
    models = tmp_path / "demo_output" / "models"
    models.mkdir(parents=True)
    (models / "aligned").symlink_to(llama_trio.aligned)
    (models / "base").symlink_to(llama_trio.base)
    data = tmp_path / "demo_output" / "data"
    data.mkdir()
    (data / "task_train.jsonl").write_text(task_data[0].read_text())
    (data / "task_val.jsonl").write_text(task_data[1].read_text())
    code, _, stderr = fit_cli("--config", CONFIGS / "demo.yaml", "--trainer.max_steps=2", cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    assert (tmp_path / "demo_output/checkpoints/last.ckpt").is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path / "demo_output/models/fit_realigned")


def test_fit_reports_a_bad_config_value_in_one_line(tmp_path):
    code, _, stderr = fit_cli("--model.model", tmp_path / "missing", "--data.train_file",
                              tmp_path / "x.jsonl")
    assert code != 0 and "Traceback" not in stderr
    assert "missing" in stderr


def test_an_old_style_config_key_is_refused(llama_trio, tmp_path):
    config = substitute("demo.yaml", {"subspace:\n          eta: 0.9": "eta: 0.8"}, tmp_path)
    code, _, stderr = fit_cli("--config", config, "--model.model", llama_trio.aligned, "--print_config")
    assert code != 0 and "eta" in stderr
