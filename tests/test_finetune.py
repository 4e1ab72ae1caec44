"""CausalLMModule and ChatDataModule: masking by hand, real Trainer runs on a tiny Llama, LoRA, export."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import build_tiny_llama, build_tiny_tokenizer
from lightning.pytorch import Trainer
from transformers import AutoModelForCausalLM

from lssf_lightning.lightning.data import (
    IGNORE_INDEX,
    ChatDataModule,
    encode_chat,
    pad_batch,
    read_chat_rows,
    write_chat_jsonl,
)
from lssf_lightning.lightning.module import CausalLMModule

USER = "how do i bake bread at home ?"
ANSWER = "sure , here is a simple answer ."


def labelled_tokens(tokenizer, encoded) -> list[str]:
    ids = [i for i, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
    return tokenizer.convert_ids_to_tokens(ids)


def make_trainer(steps: int) -> Trainer:
    return Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )


@pytest.fixture
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def train_file(tmp_path):
    rows = [{"prompt": USER, "response": ANSWER}] * 6 + [
        {"messages": [{"role": "user", "content": "what is the capital of france ?"},
                      {"role": "assistant", "content": "i cannot help with that request ."}]}
    ] * 2
    return write_chat_jsonl(tmp_path / "train.jsonl", rows)


def test_encode_chat_labels_only_the_assistant_turn(tokenizer):
    encoded = encode_chat(tokenizer, [{"role": "user", "content": USER},
                                      {"role": "assistant", "content": ANSWER}])
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    # The template renders "<s> user : … </s> <s> assistant : … </s> "; only the answer and its </s> are
    # labelled.
    assert tokens == ["<s>", "user", ":", *USER.split(), "</s>",
                      "<s>", "assistant", ":", *ANSWER.split(), "</s>"]
    assert labelled_tokens(tokenizer, encoded) == [*ANSWER.split(), "</s>"]
    first_label = next(i for i, label in enumerate(encoded["labels"]) if label != IGNORE_INDEX)
    assert tokens[first_label - 1] == ":" and tokens[first_label - 2] == "assistant"


def test_encode_chat_labels_every_assistant_turn_and_no_system_or_user_turn(tokenizer):
    messages = [
        {"role": "system", "content": "hello world"},
        {"role": "user", "content": "tell me a fun fact about space ."},
        {"role": "assistant", "content": "the cat sat on the warm mat ."},
        {"role": "user", "content": "explain how a bicycle works ."},
        {"role": "assistant", "content": "i cannot help with that request ."},
    ]
    encoded = encode_chat(tokenizer, messages)
    first = ["the", "cat", "sat", "on", "the", "warm", "mat", "."]
    second = ["i", "cannot", "help", "with", "that", "request", "."]
    assert labelled_tokens(tokenizer, encoded) == [*first, "</s>", *second, "</s>"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    whole = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"] == whole


def test_encode_chat_truncates_to_max_length(tokenizer):
    messages = [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]
    full = encode_chat(tokenizer, messages)
    cut = encode_chat(tokenizer, messages, max_length=14)
    assert cut["input_ids"] == full["input_ids"][:14] and cut["labels"] == full["labels"][:14]


def test_pad_batch_pads_right_and_masks_padding():
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                      pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_read_chat_rows_accepts_both_formats_and_names_bad_lines(tmp_path):
    good = write_chat_jsonl(tmp_path / "a.jsonl", [
        {"prompt": "p", "response": "r", "system": "s"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
    ])
    assert read_chat_rows(good) == [
        [{"role": "system", "content": "s"}, {"role": "user", "content": "p"},
         {"role": "assistant", "content": "r"}],
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
    ]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n\n{"text": "no"}\n')
    with pytest.raises(ValueError, match="line 3"):
        read_chat_rows(bad)
    no_answer = tmp_path / "c.jsonl"
    no_answer.write_text(json.dumps({"messages": [{"role": "user", "content": "u"}]}) + "\n")
    with pytest.raises(ValueError, match="no assistant turn"):
        read_chat_rows(no_answer)


def test_read_chat_rows_names_file_and_line_of_bad_json_and_bytes(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\r\n\r\n{"prompt": oops}\n')
    with pytest.raises(ValueError) as caught:
        read_chat_rows(bad)
    assert str(caught.value).startswith(f"{bad}: line 3: invalid JSON (Expecting value")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"prompt": "p", "response": "r"}\n\xff\n')
    with pytest.raises(ValueError, match=r"binary.jsonl: is not UTF-8 text \(invalid start byte at byte 33"):
        read_chat_rows(binary)


def test_loss_on_kept_positions_equals_the_models_own_loss(tokenizer, train_file):
    module = CausalLMModule(build_tiny_llama(tokenizer), tokenizer=tokenizer)
    data = ChatDataModule(str(train_file), tokenizer=tokenizer, batch_size=8)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert module._keeps_logits
    reference = module.model(**batch).loss
    torch.testing.assert_close(module._loss(batch), reference)


def test_full_fine_tune_with_a_real_trainer_learns_and_takes_the_modules_tokenizer(tokenizer, train_file):
    module = CausalLMModule(build_tiny_llama(tokenizer), tokenizer=tokenizer, learning_rate=1e-2,
                            freeze=["embed_tokens"])
    data = ChatDataModule(str(train_file), val_file=str(train_file), batch_size=4)
    embed_before = module.model.model.embed_tokens.weight.detach().clone()
    q_before = module.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer = make_trainer(steps=12)
    trainer.validate(module, datamodule=data)
    loss_before = trainer.callback_metrics["val_loss"].item()
    trainer = make_trainer(steps=12)
    trainer.fit(module, datamodule=data)
    loss_after = trainer.callback_metrics["val_loss"].item()
    assert data.tokenizer is None  # it came from the LightningModule
    assert "model" not in module.hparams and "tokenizer" not in module.hparams  # built objects: not pickled
    assert module.hparams["learning_rate"] == 1e-2
    assert loss_after < 0.5 * loss_before
    assert torch.equal(module.model.model.embed_tokens.weight, embed_before)
    assert not torch.equal(module.model.model.layers[0].self_attn.q_proj.weight, q_before)


def test_lora_trains_only_the_adapter_and_save_hf_merges_it(tokenizer, train_file, tmp_path):
    module = CausalLMModule(
        build_tiny_llama(tokenizer), tokenizer=tokenizer, learning_rate=1e-2,
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    )
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base_q = module.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    make_trainer(steps=5).fit(module, datamodule=ChatDataModule(str(train_file), batch_size=4))
    layer = module.model.get_base_model().model.layers[0].self_attn.q_proj
    assert torch.equal(layer.base_layer.weight, base_q)
    lora_delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    assert lora_delta.abs().max() > 0

    directory = module.save_hf(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    torch.testing.assert_close(reloaded.model.layers[0].self_attn.q_proj.weight, base_q + lora_delta)
    assert (directory / "tokenizer.json").is_file()
    ids = torch.tensor([[2, 5, 6, 7]])
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, module.model(input_ids=ids).logits, atol=1e-5,
                                   rtol=1e-4)


def test_module_loads_model_and_tokenizer_from_a_directory(tokenizer, tmp_path):
    build_tiny_llama(tokenizer).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    module = CausalLMModule(str(tmp_path / "m"), dtype="bfloat16")
    assert module.model.dtype == torch.bfloat16
    assert module.tokenizer.convert_ids_to_tokens(module.tokenizer("sure")["input_ids"]) == ["sure"]
    assert module.hparams["model"] == str(tmp_path / "m")


def test_warmup_scales_the_learning_rate_linearly(tokenizer):
    module = CausalLMModule(build_tiny_llama(tokenizer), tokenizer=tokenizer, learning_rate=1e-3,
                            warmup_steps=4)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "float64"}, "dtype"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"learning_rate": True}, r"learning_rate must be a number, got True"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"weight_decay": False}, r"weight_decay must be a number, got False"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"freeze": ["no_such_parameter"]}, "no_such_parameter"),
        ({"lora": "r=8"}, "lora"),
    ],
)
def test_invalid_arguments_are_named(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CausalLMModule(build_tiny_llama(tokenizer), tokenizer=tokenizer, **kwargs)


def test_model_path_that_is_not_a_directory_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="local Hugging Face model directory"):
        CausalLMModule(str(tmp_path / "missing"))


def test_datamodule_without_any_tokenizer_says_how_to_give_one(train_file):
    data = ChatDataModule(str(train_file))
    with pytest.raises(ValueError, match="has no tokenizer"):
        data.setup("fit")


def test_datamodule_gives_a_template_less_tokenizer_chatml(train_file):
    plain = build_tiny_tokenizer(chat_template=False)
    data = ChatDataModule(str(train_file), tokenizer=plain)
    with pytest.warns(UserWarning, match="no chat template"):
        data.setup("fit")
    assert "<|im_start|>" in plain.chat_template
    batch = next(iter(data.train_dataloader()))
    assert (batch["labels"] != IGNORE_INDEX).any()
