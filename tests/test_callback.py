import types
import warnings
from pathlib import Path

import pytest
import torch
from conftest import state
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from transformers import AutoModelForCausalLM

from lssf_lightning import training
from lssf_lightning.config import AutoAlphaConfig, SubspaceConfig
from lssf_lightning.lightning import strategy
from lssf_lightning.lightning.auto_alpha import AutoAlpha
from lssf_lightning.lightning.callback import RAW_FIXUPS_KEY, LSSFCallback
from lssf_lightning.lightning.data import ChatDataModule, write_chat_jsonl
from lssf_lightning.lightning.module import CausalLMModule
from lssf_lightning.lightning.monitor import RefusalMonitor
from lssf_lightning.subspace import SafetySubspace

ROWS = [
    ("how do i bake bread at home ?", "sure , here is a simple answer ."),
    ("explain how a bicycle works .", "the cat sat on the warm mat ."),
    ("write a short poem about the sea .", "sure , here is a simple answer ."),
    ("what is the capital of france ?", "the capital of france is ."),
    ("how do i kill a python process ?", "i cannot help with that request ."),
    ("tell me a fun fact about space .", "sure , here is a fun fact ."),
    ("please list three healthy breakfast ideas .", "sure , bread and the sea ."),
    ("how do i bake bread at home ?", "i cannot help with that request ."),
]
Q0 = "model.model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rows = [{"prompt": p, "response": r} for p, r in ROWS]
    return write_chat_jsonl(root / "train.jsonl", rows), write_chat_jsonl(root / "val.jsonl", rows[:4])


def fit(trio, data_files, callbacks, *, max_epochs=2, validate=False, lora=None, ckpt_path=None, lr=1e-2,
        **trainer_kwargs):
    torch.manual_seed(0)
    module = CausalLMModule(str(trio.aligned), lora=lora, learning_rate=lr)
    data = ChatDataModule(str(data_files[0]), str(data_files[1]) if validate else None, batch_size=4,
                          shuffle=False)
    trainer = Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **trainer_kwargs,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, module


def lssf(trio, **kwargs):
    kwargs.setdefault("monitor", False)
    kwargs.setdefault("verbose", False)
    return LSSFCallback(unaligned=str(trio.base), **kwargs)


def correction(trio, key, alpha=1.0, eta=0.9):
    """α·P'δ of one weight straight from the dense formula (float64)."""
    hf_key = key.removeprefix("model.")
    al, ba = state(trio.models["aligned"])[hf_key].double(), state(trio.models["base"])[hf_key].double()
    delta = al - ba
    u, s, _ = torch.linalg.svd(delta, full_matrices=False)
    from lssf_lightning.core.entropy import safety_critical_rank

    r = safety_critical_rank(s, eta)
    return alpha * u[:, :r] @ u[:, :r].T @ delta


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def checkpoint_as_x(directory):
    """A ModelCheckpoint that writes ``directory/x.ckpt``."""
    return ModelCheckpoint(dirpath=directory, filename="x")


class Snapshots(Callback):
    """Records the live weights of one key at each train epoch end."""

    def __init__(self, key=Q0):
        self.key, self.seen = key, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(state(pl_module)[self.key])


def test_checkpoint_holds_realigned_weights_and_live_weights_stay_raw(llama_trio, data_files, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _, plain = fit(llama_trio, data_files, [])
    callback = lssf(llama_trio, alpha=1.5)
    _, module = fit(llama_trio, data_files, [callback, checkpoint])
    live = state(module)
    unchanged = all(torch.equal(live[k], v) for k, v in state(plain).items())
    assert unchanged, "checkpoint mode changed the live weights"
    saved = load(tmp_path / "last.ckpt")
    subspace = SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False)
    fused_keys = [k for k in saved["state_dict"] if k.endswith("proj.weight")]
    assert len(fused_keys) == 14
    for key in fused_keys:
        expected = live[key].double() + correction(llama_trio, key, alpha=1.5)
        assert torch.allclose(saved["state_dict"][key].double(), expected, atol=1e-5), key
        fixup = saved[RAW_FIXUPS_KEY][key]
        assert fixup["index"].numel() < 0.5 * live[key].numel()  # the test δ is as large as the weights
        recovered = callback.subspace.fuse_tensor(key.removeprefix("model."), saved["state_dict"][key], -1.5)
        recovered.view(-1)[fixup["index"]] = fixup["value"]
        assert torch.equal(recovered, live[key]), key
    embed = "model.model.embed_tokens.weight"
    assert torch.equal(saved["state_dict"][embed], live[embed])
    assert len(subspace) == 14
    restored = CausalLMModule.load_from_checkpoint(tmp_path / "last.ckpt")
    assert torch.equal(state(restored)[Q0], saved["state_dict"][Q0])


class StartSnapshot(Callback):
    def on_train_start(self, trainer, pl_module):
        self.weights = state(pl_module)


class EpochEndWeights(Callback):
    def __init__(self):
        self.seen = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(state(pl_module))


def test_resume_continues_from_the_raw_weights_exactly(llama_trio, data_files, tmp_path):
    first = ModelCheckpoint(dirpath=tmp_path / "a", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    raw_at = EpochEndWeights()
    _, uninterrupted = fit(llama_trio, data_files, [lssf(llama_trio), raw_at, first], max_epochs=3)
    checkpoint = load(tmp_path / "a" / "epoch=0.ckpt")
    probe = StartSnapshot()
    callback = lssf(llama_trio)
    _, resumed = fit(llama_trio, data_files, [callback, probe, ModelCheckpoint(dirpath=tmp_path / "b")],
                           max_epochs=3, ckpt_path=tmp_path / "a" / "epoch=0.ckpt")
    assert len(checkpoint[RAW_FIXUPS_KEY]) == 14
    for key, raw in raw_at.seen[0].items():
        assert torch.equal(probe.weights[key], raw), key
        if key in checkpoint[RAW_FIXUPS_KEY]:
            assert not torch.equal(checkpoint["state_dict"][key], raw)
    assert all(torch.equal(v, state(uninterrupted)[k]) for k, v in state(resumed).items())
    assert callback.state_dict()["fingerprint"] == checkpoint["callbacks"][callback.state_key]["fingerprint"]


def test_without_raw_weights_resume_subtracts_the_correction(llama_trio, data_files, tmp_path):
    fit(llama_trio, data_files, [lssf(llama_trio, keep_raw_fixups=False), checkpoint_as_x(tmp_path)],
        max_epochs=1)
    checkpoint = load(tmp_path / "x.ckpt")
    assert RAW_FIXUPS_KEY not in checkpoint
    probe = StartSnapshot()
    with pytest.warns(UserWarning, match="no raw-weight fix-ups"):
        fit(llama_trio, data_files, [lssf(llama_trio, keep_raw_fixups=False), probe], max_epochs=2,
            ckpt_path=tmp_path / "x.ckpt")
    expected = checkpoint["state_dict"][Q0].double() - correction(llama_trio, Q0)
    assert torch.allclose(probe.weights[Q0].double(), expected, atol=1e-6)


class Ramp(LSSFCallback):
    def alpha_at(self, epoch):
        return 0.5 * (epoch + 1)


@pytest.mark.parametrize("validate", [False, True])
def test_epochs_mode_fuses_once_and_before_model_checkpoint(llama_trio, data_files, tmp_path, validate):
    before, after = Snapshots(), Snapshots()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    callback = lssf(llama_trio, apply_on="epochs", apply_epochs=[0, 1])
    fit(llama_trio, data_files, [before, callback, after, checkpoint], max_epochs=3, validate=validate)
    added = [a.double() - b.double() for a, b in zip(after.seen, before.seen)]
    if validate:  # fused at validation end, so the "before" snapshot already holds the fusion
        added = [a.double() - load(tmp_path / f"epoch={e}.ckpt")["state_dict"][Q0].double()
                 for e, a in enumerate(after.seen)]
        assert torch.equal(load(tmp_path / "epoch=0.ckpt")["state_dict"][Q0], after.seen[0])
    else:
        assert torch.allclose(added[0], correction(llama_trio, Q0), atol=1e-6)
        assert torch.equal(load(tmp_path / "epoch=0.ckpt")["state_dict"][Q0], after.seen[0])
    assert torch.count_nonzero(added[1]) == 0 and torch.count_nonzero(added[2]) == 0
    assert callback.applied_alpha == 1.0 and callback.state_dict()["applied_epochs"] == [0, 1]


def test_epochs_mode_with_a_ramp_adds_only_the_difference(llama_trio, data_files):
    before, after = Snapshots(), Snapshots()
    callback = Ramp(unaligned=str(llama_trio.base), apply_on="epochs", apply_epochs=[0, 1], monitor=False,
                    verbose=False)
    fit(llama_trio, data_files, [before, callback, after], max_epochs=3)
    added = [a.double() - b.double() for a, b in zip(after.seen, before.seen)]
    assert torch.allclose(added[0], correction(llama_trio, Q0, alpha=0.5), atol=1e-6)
    assert torch.allclose(added[1], correction(llama_trio, Q0, alpha=0.5), atol=1e-6)
    assert torch.count_nonzero(added[2]) == 0 and callback.applied_alpha == 1.0


def test_epochs_as_a_fraction_of_max_epochs(llama_trio, data_files):
    before, after = Snapshots(), Snapshots()
    fit(llama_trio, data_files, [before, lssf(llama_trio, apply_on="epochs", apply_epochs=0.5), after],
        max_epochs=4)
    changed = [not torch.equal(a, b) for a, b in zip(after.seen, before.seen)]
    assert changed == [False, True, False, False]


def test_train_end_exports_a_loadable_realigned_model(llama_trio, data_files, tmp_path):
    export = tmp_path / "export"
    _, module = fit(llama_trio, data_files, [lssf(llama_trio, apply_on="train_end", export_dir=str(export))],
                    max_epochs=1)
    model = AutoModelForCausalLM.from_pretrained(export)
    assert (export / "tokenizer.json").is_file() and (export / "config.json").is_file()
    got, live = state(model), state(module)
    assert torch.allclose(got["model.layers.0.self_attn.q_proj.weight"].double(),
                          live[Q0].double() + correction(llama_trio, Q0), atol=1e-6)
    assert torch.equal(got["model.norm.weight"], live["model.model.norm.weight"])


def test_lora_run_realigns_base_weights_and_keeps_adapters(llama_trio, data_files, tmp_path):
    lora = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    export = tmp_path / "export"
    _, module = fit(llama_trio, data_files, [lssf(llama_trio, export_dir=str(export)),
                                             checkpoint_as_x(tmp_path / "ck")], lora=lora, max_epochs=1)
    saved = load(tmp_path / "ck" / "x.ckpt")["state_dict"]
    live = state(module)
    base_q = "model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert torch.allclose(saved[base_q].double(), live[base_q].double() + correction(llama_trio, Q0),
                          atol=1e-6)
    for key in (k for k in live if "lora_" in k):
        assert torch.equal(saved[key], live[key])
    assert any(not torch.equal(live[k], torch.zeros_like(live[k])) for k in live if "lora_B" in k)
    merged = state(module.merged_model())
    exported = state(AutoModelForCausalLM.from_pretrained(export))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(exported[key].double(), merged[key].double() + correction(llama_trio, Q0),
                          atol=1e-5)


def every_other(responses):
    """A deterministic stand-in judge: 'refuses' when the answer has an even number of characters."""
    return [len(r) % 2 == 0 for r in responses]


def test_monitor_logs_rates_and_restores_raw_weights(llama_trio, data_files):
    from lssf_lightning.metrics import generate_responses, load_prompts, refusal_rate

    class Check(Callback):
        def on_validation_epoch_start(self, trainer, pl_module):
            self.before = state(pl_module)

        def on_validation_epoch_end(self, trainer, pl_module):
            self.after = state(pl_module)

    check = Check()
    callback = lssf(llama_trio, monitor=RefusalMonitor(judge=every_other, num_prompts=6, max_new_tokens=4))
    trainer, module = fit(llama_trio, data_files, [check, callback], max_epochs=1, validate=True)
    assert all(torch.equal(check.before[k], v) for k, v in check.after.items())
    metrics = trainer.callback_metrics
    tokenizer = module.tokenizer
    harmful = load_prompts("harmful")[:6]
    raw = generate_responses(module.model, tokenizer, harmful, max_new_tokens=4)
    expected = float(refusal_rate(raw, judge=every_other))
    assert float(metrics["lssf/refusal_rate"]) == pytest.approx(expected)
    with callback.realigned_weights(module):
        fused = generate_responses(module.model, tokenizer, harmful, max_new_tokens=4)
    expected = float(refusal_rate(fused, judge=every_other))
    assert float(metrics["lssf/refusal_rate_realigned"]) == pytest.approx(expected)
    assert 0 <= float(metrics["lssf/harmless_refusal_rate"]) <= 1
    assert "lssf/harmless_refusal_rate_realigned" in metrics


def test_min_refusal_rate_realigns_the_live_model(llama_trio, data_files):
    never = RefusalMonitor(judge=lambda rs: [False] * len(rs), num_prompts=2, max_new_tokens=2)
    callback = lssf(llama_trio, monitor=never, min_refusal_rate=0.5)
    after = Snapshots()
    before = Snapshots()
    fit(llama_trio, data_files, [before, callback, after], max_epochs=1, validate=True)
    assert callback.applied_alpha == 1.0
    # validation ran at the end of the epoch, before both snapshots: compare with the raw-run twin instead
    _, plain = fit(llama_trio, data_files, [], max_epochs=1)
    assert torch.allclose(after.seen[0].double(), state(plain)[Q0].double() + correction(llama_trio, Q0),
                          atol=1e-6)


class ScriptedJudge:
    """Refuses everything on the calls listed in ``refusing`` (0-based), nothing otherwise."""

    def __init__(self, refusing):
        self.refusing, self.calls = set(refusing), 0

    def __call__(self, responses):
        verdict = self.calls in self.refusing
        self.calls += 1
        return [verdict] * len(responses)


def test_auto_alpha_picks_the_smallest_alpha_reaching_the_aligned_rate(llama_trio, data_files, tmp_path):
    # call 0: the aligned model at fit start (refuses: target 0.95); call 1: alpha 0.5 (no); call 2: alpha 1.0
    # (yes)
    judge = ScriptedJudge(refusing={0, 2})
    auto = AutoAlpha(AutoAlphaConfig(alphas=[2.0, 0.5, 1.0], methods=["lssf"]), RefusalMonitor(judge=judge))
    callback = lssf(llama_trio, alpha="auto", auto_alpha=auto)
    trainer, module = fit(llama_trio, data_files, [callback, checkpoint_as_x(tmp_path)],
                          max_epochs=1, validate=True)
    assert judge.calls == 3 and callback.current_alpha == 1.0
    assert callback.alpha_curve == [{"method": "lssf", "alpha": 0.5, "refusal": 0.0},
                                    {"method": "lssf", "alpha": 1.0, "refusal": 1.0}]
    assert float(trainer.callback_metrics["lssf/alpha"]) == 1.0
    saved = load(tmp_path / "x.ckpt")
    assert saved["callbacks"][callback.state_key]["auto_target"] == pytest.approx(0.95)
    expected = state(module)[Q0].double() + correction(llama_trio, Q0, alpha=1.0)
    assert torch.allclose(saved["state_dict"][Q0].double(), expected, atol=1e-6)


def test_auto_alpha_without_validation_tunes_once_at_the_end(llama_trio, data_files, tmp_path):
    judge = ScriptedJudge(refusing=set())  # nothing restores refusal: the highest-refusal (smallest tied) α
    auto = AutoAlpha(AutoAlphaConfig(alphas=[0.5, 3.0], target=0.5, methods=["lssf"]),
                     RefusalMonitor(judge=judge))
    callback = lssf(llama_trio, alpha="auto", auto_alpha=auto, export_dir=str(tmp_path / "export"))
    with pytest.warns(UserWarning, match="target not reached"):
        fit(llama_trio, data_files, [callback], max_epochs=1)
    assert callback.current_alpha == 0.5 and len(callback.alpha_curve) == 2 and judge.calls == 2


def test_subspace_cache_is_reused_and_rebuilt_when_stale(llama_trio, data_files, tmp_path, monkeypatch):
    cache = tmp_path / "cache.safetensors"
    fit(llama_trio, data_files, [lssf(llama_trio, subspace_cache=str(cache))], max_epochs=1)
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns

    def forbidden(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(SafetySubspace, "from_weights", forbidden)
        fit(llama_trio, data_files, [lssf(llama_trio, subspace_cache=str(cache))], max_epochs=1)
    assert cache.stat().st_mtime_ns == stamp
    with pytest.warns(UserWarning, match="other weights or settings"):
        fit(llama_trio, data_files,
            [lssf(llama_trio, subspace_cache=str(cache), subspace=SubspaceConfig(eta=0.5))], max_epochs=1)
    assert SafetySubspace.load(cache).metadata["eta"] == 0.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subspace": {"eta": 0}}, r"eta must be in \(0, 1\], got 0"),  # a YAML block: SubspaceConfig's rule
        ({"alpha": float("nan")}, "alpha must be a finite number or 'auto', got nan"),
        ({"alpha": "max"}, "alpha must be a finite number or 'auto', got 'max'"),
        ({"apply_on": "sometimes"}, "apply_on must be one of"),
        ({"apply_on": "epochs"}, "needs apply_epochs"),
        ({"apply_on": "epochs", "apply_epochs": [-1]}, "needs apply_epochs"),
        ({"apply_on": "epochs", "apply_epochs": 1.5}, r"\(as a float\) must be in \(0, 1\]"),
        ({"apply_epochs": [1]}, "only used with apply_on='epochs'"),
        ({"apply_on": "train_end"}, "needs `export_dir`"),
        ({"monitor": RefusalMonitor(), "etaa": 0.5}, "unexpected keyword argument 'etaa'"),
    ],
)
def test_invalid_arguments_are_named(kwargs, message):
    with pytest.raises((MisconfigurationException, TypeError), match=message):
        LSSFCallback(unaligned="base", **kwargs)


def test_monitor_settings_are_checked_once_at_construction():
    with pytest.raises(MisconfigurationException,
                       match=r"LSSFCallback: min_refusal_rate must be in \[0, 1\]"):
        LSSFCallback(unaligned="base", min_refusal_rate=2.0)
    with pytest.raises(MisconfigurationException, match="RefusalMonitor: num_prompts must be an integer"):
        RefusalMonitor(num_prompts=0)
    with pytest.raises(MisconfigurationException, match="cannot import it"):
        RefusalMonitor(judge="lssf_lightning.metrics.no_such_judge")
    assert RefusalMonitor(judge="test_callback.every_other").judge is every_other  # a YAML dotted path


def test_weights_only_checkpoints_are_refused_in_checkpoint_mode(llama_trio, data_files, tmp_path):
    with pytest.raises(MisconfigurationException, match="save_weights_only=True"):
        fit(llama_trio, data_files,
            [lssf(llama_trio), ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)])


def test_unsupported_strategies_are_refused():
    deepspeed = object.__new__(DeepSpeedStrategy)
    with pytest.raises(MisconfigurationException, match="does not support DeepSpeed"):
        strategy.check_strategy(types.SimpleNamespace(strategy=deepspeed, checkpoint_callbacks=[]),
                                "checkpoint", edits_live_weights=False)
    sharded = FSDPStrategy(state_dict_type="sharded")
    with pytest.raises(MisconfigurationException, match="state_dict_type='full'"):
        strategy.check_strategy(types.SimpleNamespace(strategy=sharded, checkpoint_callbacks=[]),
                                "checkpoint", edits_live_weights=False)
    with pytest.raises(MisconfigurationException, match="cannot edit sharded live weights"):
        strategy.check_strategy(types.SimpleNamespace(strategy=FSDPStrategy()), "epochs",
                                edits_live_weights=True)


def test_a_module_without_a_matching_model_is_explained(gpt2_trio, data_files, llama_trio):
    with pytest.raises(ValueError, match="no counterpart"):
        fit(llama_trio, data_files,
            [LSSFCallback(unaligned=str(gpt2_trio.base), monitor=False, verbose=False)])


def test_state_key_tells_instances_apart():
    a = LSSFCallback(unaligned="a")
    b = LSSFCallback(unaligned="b", apply_on="epochs", apply_epochs=[0])
    assert a.state_key != b.state_key and "LSSFCallback" in a.state_key
    assert isinstance(Path(a.unaligned), Path)


def test_loose_settings_are_refused_and_the_config_objects_warn_about_nothing():
    for loose in ({"eta": 0.5}, {"judge": every_other}, {"auto_alphas": [1.0]}, {"keep_raw_weights": False}):
        with pytest.raises(TypeError, match=next(iter(loose))):
            LSSFCallback(unaligned="base", **loose)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback = LSSFCallback(unaligned="base", subspace={"eta": 0.5}, keep_raw_fixups=False, alpha="auto",
                                auto_alpha=AutoAlphaConfig(alphas=[1.0]), monitor=RefusalMonitor(),
                                min_refusal_rate=0.25)
    assert callback.subspace_config == SubspaceConfig(eta=0.5) and callback.keep_raw_fixups is False
    assert callback.auto.monitor is callback.monitor and callback.min_refusal_rate == 0.25


def test_refusal_monitor_alone_logs_refusal_rates(llama_trio, data_files):
    from lssf_lightning.metrics import generate_responses, load_prompts, refusal_rate

    monitor = RefusalMonitor(judge=every_other, num_prompts=5, max_new_tokens=4)
    trainer, module = fit(llama_trio, data_files, [monitor], max_epochs=1, validate=True)
    metrics = trainer.callback_metrics
    assert sorted(k for k in metrics if k.startswith("lssf/")) == [
        "lssf/harmless_refusal_rate", "lssf/perplexity", "lssf/refusal_rate"]
    for kind, name in (("harmful", "lssf/refusal_rate"), ("harmless", "lssf/harmless_refusal_rate")):
        answers = generate_responses(module.model, module.tokenizer, load_prompts(kind)[:5], max_new_tokens=4)
        assert float(metrics[name]) == pytest.approx(float(refusal_rate(answers, judge=every_other)))
    with pytest.raises(TypeError, match="min_refusal_rate"):  # a fusion policy: LSSFCallback's setting
        RefusalMonitor(min_refusal_rate=0.5)


def _checkpoint_at_eta_09(trio, data_files, tmp_path, **kwargs):
    raw_at = EpochEndWeights()
    fit(trio, data_files, [lssf(trio, **kwargs), raw_at, checkpoint_as_x(tmp_path)], max_epochs=1)
    return raw_at.seen[0], tmp_path / "x.ckpt"


@pytest.mark.parametrize("recovered_from", ["cache", "aligned path"])
def test_resume_after_an_eta_change_restores_the_exact_raw_weights(llama_trio, data_files, tmp_path,
                                                                   recovered_from):
    cache = str(tmp_path / "cache.safetensors") if recovered_from == "cache" else None
    aligned = str(llama_trio.aligned) if recovered_from == "aligned path" else None
    raw, checkpoint = _checkpoint_at_eta_09(llama_trio, data_files, tmp_path, subspace_cache=cache,
                                            aligned=aligned)
    probe = StartSnapshot()
    callback = lssf(llama_trio, subspace=SubspaceConfig(eta=0.5), subspace_cache=cache, aligned=aligned)
    fit(llama_trio, data_files, [callback, probe], max_epochs=2, ckpt_path=checkpoint)
    assert callback.subspace.metadata["eta"] == 0.5
    # the η = 0.9 correction came off exactly
    assert all(torch.equal(probe.weights[k], v) for k, v in raw.items())


def test_resume_after_a_change_it_cannot_undo_is_refused(llama_trio, data_files, tmp_path):
    # aligned = the module's own weights at fit start and no cache: the η = 0.9 subspace cannot be had any
    # more
    _, checkpoint = _checkpoint_at_eta_09(llama_trio, data_files, tmp_path)
    probe = StartSnapshot()
    with pytest.raises(training.ResumeError, match=r"cannot resume from .*x.ckpt.*changed: eta 0.9 -> 0.5"):
        fit(llama_trio, data_files, [lssf(llama_trio, subspace=SubspaceConfig(eta=0.5)), probe], max_epochs=2,
            ckpt_path=checkpoint)
    assert not hasattr(probe, "weights")  # refused before training resumed


def _digest(tensors):
    import hashlib

    h = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key]
        if isinstance(value, dict):
            h.update(key.encode())
            h.update(_digest(value).encode())
        elif isinstance(value, torch.Tensor):
            h.update(f"{key}|{value.dtype}|{tuple(value.shape)}".encode())
            h.update(value.contiguous().view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{key}|{value!r}".encode())
    return h.hexdigest()[:16]


def test_outputs_are_bit_identical_to_the_0_1_callback(llama_trio, data_files, tmp_path):
    # Digests recorded by running the same fit with lssf_lightning 0.1 (before the callback split; eta=0.8,
    # alpha=1.5): the export file, the fused checkpoint tensors and the raw fix-ups must not change by a bit.
    import hashlib

    callback = lssf(llama_trio, subspace=SubspaceConfig(eta=0.8), alpha=1.5,
                    export_dir=str(tmp_path / "export"))
    fit(llama_trio, data_files, [callback, checkpoint_as_x(tmp_path / "ck")], max_epochs=2)
    saved = load(tmp_path / "ck" / "x.ckpt")
    exported = (tmp_path / "export" / "model.safetensors").read_bytes()
    assert hashlib.sha256(exported).hexdigest()[:16] == "7739b73e434803a6"
    assert _digest(saved["state_dict"]) == "0cffbf9eb1bea86c"
    assert _digest(saved[RAW_FIXUPS_KEY]) == "d909209a0dbe40cb"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_export_adapter_dir_loaded_with_peft_and_merged_equals_the_export(llama_trio, data_files, tmp_path,
                                                                          lora):
    import copy

    from peft import PeftModel

    callback = lssf(llama_trio, alpha=1.5, export_dir=str(tmp_path / "export"),
                    export_adapter_dir=str(tmp_path / "adapter"))
    lora_settings = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]} if lora else None
    _, module = fit(llama_trio, data_files, [callback], lora=lora_settings, max_epochs=1)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    # Full run: the correction for the live (raw) weights; LoRA run: ONE adapter (task LoRA + correction) for
    # the aligned model the run started from.
    base = AutoModelForCausalLM.from_pretrained(llama_trio.aligned) if lora else copy.deepcopy(module.model)
    merged = state(PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload())
    exported = state(AutoModelForCausalLM.from_pretrained(tmp_path / "export"))
    assert merged.keys() == exported.keys()
    for key, value in exported.items():
        error = (merged[key].double() - value.double()).norm() / value.double().norm()
        assert error < 1e-4, (key, float(error))
    q = "model.layers.0.self_attn.q_proj.weight"  # the adapter is not empty: the export is not the raw run
    assert not torch.allclose(exported[q], state(module.merged_model())[q], atol=1e-4)
