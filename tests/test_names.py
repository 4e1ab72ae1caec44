import pytest
from _tiny import TINY_LLAMA_LINEARS

from lssf_lightning.io.names import (
    KeyMatcher,
    canonical_key,
    in_transformer_block,
    is_adapter_key,
    matches_modules,
)

HF = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")]


@pytest.mark.parametrize(
    ("key", "canonical"),
    [
        ("_forward_module.model._orig_mod.layers.0.q.weight", "model.layers.0.q.weight"),
        ("module.model.layers.0.q.weight", "model.layers.0.q.weight"),
        ("base_model.model.model.layers.0.q.base_layer.weight", "model.layers.0.q.weight"),
        ("base_model.model.lm_head.modules_to_save.default.weight", "lm_head.weight"),
        ("model._fsdp_wrapped_module.layers.0.q.weight", "model.layers.0.q.weight"),
        ("model.layers.0.q.weight", "model.layers.0.q.weight"),
    ],
)
def test_canonical_key_strips_wrappers(key, canonical):
    assert canonical_key(key) == canonical


def test_adapter_keys_are_recognised():
    assert is_adapter_key("base_model.model.model.layers.0.q_proj.lora_A.default.weight")
    assert is_adapter_key("x.q_proj.lora_B.weight")
    assert not is_adapter_key("model.layers.0.q_proj.base_layer.weight")


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("model.model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"),
        (
            "_forward_module.net._orig_mod.model.layers.0.self_attn.v_proj.weight",
            "model.layers.0.self_attn.v_proj.weight",
        ),
        (
            "base_model.model.model.layers.1.self_attn.v_proj.base_layer.weight",
            "model.layers.1.self_attn.v_proj.weight",
        ),
        ("layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", None),
        ("q_proj.weight", None),
        ("self_attn.q_proj.weight", None),
        ("model.layers.7.self_attn.q_proj.weight", None),
        ("transformer.h.0.attn.c_attn.weight", None),
    ],
)
def test_key_matcher_longest_common_suffix(key, expected):
    assert KeyMatcher(HF).match(key) == expected


def test_short_whole_keys_match_but_bare_leaves_do_not():
    matcher = KeyMatcher(["lm_head.weight", "model.norm.weight"])
    assert matcher.match("model.lm_head.weight") == "lm_head.weight"
    assert matcher.match("weight") is None


def test_two_keys_claiming_one_reference_is_an_error():
    matcher = KeyMatcher(HF)
    with pytest.raises(ValueError, match="both"):
        matcher.match_all(
            ["a.model.layers.0.self_attn.q_proj.weight", "b.model.layers.0.self_attn.q_proj.weight"]
        )


def test_peft_style_module_selection():
    name = "model.layers.3.self_attn.q_proj"
    assert matches_modules(name, ["q_proj", "v_proj"])
    assert matches_modules(name, ["self_attn.q_proj"])
    assert not matches_modules(name, ["proj"])
    assert matches_modules(name, r".*\.3\..*q_proj")
    assert not matches_modules(name, r"q_proj")
    assert not matches_modules(name, None)


def test_transformer_block_rule():
    assert in_transformer_block("model.layers.0.mlp.down_proj.weight")
    assert in_transformer_block("transformer.h.11.attn.c_attn.weight")
    assert not in_transformer_block("model.layers.0.input_layernorm.weight")
    assert not in_transformer_block("model.embed_tokens.weight")
    assert not in_transformer_block("lm_head.weight")
    assert not in_transformer_block("model.layers.0.mlp.down_proj.bias")
    assert not in_transformer_block("transformer.h.0.ln_1.weight")


@pytest.mark.parametrize(
    ("target", "exclude"),
    [
        (["q_proj", "v_proj"], None),
        (["self_attn.q_proj", "mlp.down_proj"], ["layers.1.mlp.down_proj"]),
        (["proj"], None),
        (r".*\.1\..*_proj", None),
        (r".*_proj", r".*\.0\.mlp\..*"),
        (["mlp.up_proj", "o_proj"], r".*o_proj"),
    ],
)
def test_module_selection_agrees_with_peft(target, exclude):
    """Our copy of peft's target/exclude rules selects exactly the modules peft itself selects."""
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists

    config = peft.LoraConfig(target_modules=target, exclude_modules=exclude)
    names = [
        f"model.layers.{i}.{part}" for i in range(3) for part in (*TINY_LLAMA_LINEARS, "input_layernorm")
    ] + ["lm_head", "model.embed_tokens", "q_proj"]
    ours = {n for n in names if matches_modules(n, target) and not matches_modules(n, exclude)}
    theirs = {n for n in names if check_target_module_exists(config, n)}
    assert ours == theirs
