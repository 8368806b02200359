"""Hugging Face interop: tiny random Llama, Mixtral and Jamba saved by transformers, imported
through the CLI (`hybridtron import-hf`), loaded with `trainer.checkpoint.load_pretrained`: fp32 logits (and,
for Llama and Jamba, gradients) match transformers; `export-hf` gives a directory transformers
loads with identical logits; configs we cannot express fail naming the HF field."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    JambaConfig,
    JambaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)
from transformers.utils import logging as hf_logging

from arch.hf import FAMILIES, HFInteropError, config_from_hf, config_to_hf, read_hf_config
from launch.cli import main
from trainer.checkpoint import CheckpointReader, load_pretrained, verify_checkpoint

VOCAB = 200  # not a multiple of 128: the embedding is not padded
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Constant-initialised parameters (norms, D, dt bias, conv bias) made random."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("D", "A_log", "dt_proj.bias", "conv1d.bias")) or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(**COMMON, num_hidden_layers=2, rope_theta=5000.0, rms_norm_eps=1e-5)
    return _perturb(LlamaForCausalLM(cfg))


def _mixtral() -> MixtralForCausalLM:
    cfg = MixtralConfig(**COMMON, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)
    return _perturb(MixtralForCausalLM(cfg))


def _jamba() -> JambaForCausalLM:
    cfg = JambaConfig(
        **COMMON,
        num_hidden_layers=4,
        num_experts=4,
        num_experts_per_tok=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=4,
        attn_layer_offset=2,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        use_mamba_kernels=False,
    )
    return _perturb(JambaForCausalLM(cfg))


BUILDERS = {"llama": _llama, "mixtral": _mixtral, "jamba": _jamba}
PATTERNS = {"llama": "*-*-", "mixtral": "*E*E", "jamba": "M-ME*-ME"}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """family -> (HF model, HF dir, hybridtron run dir), imported through the CLI."""
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    out = {}
    for family, build in BUILDERS.items():
        root = tmp_path_factory.mktemp(family)
        model = build()
        model.save_pretrained(root / "hf")
        assert main(["import-hf", str(root / "hf"), str(root / "run")]) == 0
        out[family] = (model, root / "hf", root / "run")
    return out


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(BUILDERS))
def test_import_gives_transformers_logits(imported, family):
    hf_model, _, run = imported[family]
    checkpoint = verify_checkpoint(run / "checkpoints" / "step_00000000")
    model_cfg = checkpoint.config["model"]
    assert model_cfg["pattern"] == PATTERNS[family]
    assert model_cfg["attention"]["rope"] == (family != "jamba")
    if family == "llama":
        assert model_cfg["attention"]["rope_theta"] == 5000.0
        assert model_cfg["norm_eps"] == 1e-5 and model_cfg["vocab_pad_multiple"] == VOCAB
    if family != "llama":
        assert model_cfg["moe"]["renormalize"] == (family == "mixtral")
    reader = CheckpointReader(checkpoint)
    assert reader.trainer_state()["step"] == 0 and not reader.torch_optimizer_state()["state"]
    ours = load_pretrained(run)
    assert not ours.training
    ids = _ids()
    with torch.no_grad():
        ref = hf_model(input_ids=ids, use_cache=False).logits
        out = ours(ids)
    assert out.shape == ref.shape == (2, 24, VOCAB)
    # fp32 against transformers: measured <= 2.1e-7 over 1/2 threads and kernels (480x).
    assert (out - ref).abs().max() < 1e-4, (out - ref).abs().max()


@pytest.mark.parametrize("family", ["llama", "jamba"])
def test_gradients_match_transformers(imported, family):
    hf_model, _, run = imported[family]
    ours = load_pretrained(run)
    ids = _ids(1)

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    hf_model.zero_grad()
    loss_of(hf_model(input_ids=ids, use_cache=False).logits).backward()
    loss_of(ours(ids)).backward()
    theirs = {n: p.grad for n, p in hf_model.named_parameters()}
    hf_grads = FAMILIES[family].from_hf(theirs, ours.cfg)
    for name, p in ours.named_parameters():
        # Measured <= 3.7e-8 over 1/2 threads and default/avx2/avx512 kernels (270x).
        torch.testing.assert_close(p.grad, hf_grads[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_export_round_trip_loads_in_transformers(imported, family, tmp_path):
    hf_model, hf_dir, run = imported[family]
    assert main(["export-hf", str(run), str(tmp_path)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(exported) is type(hf_model)
    ids = _ids(2)
    with torch.no_grad():
        a = hf_model(input_ids=ids, use_cache=False).logits
        b = exported(input_ids=ids, use_cache=False).logits
    assert torch.equal(a, b)
    # the exported directory is itself importable
    assert config_from_hf(read_hf_config(tmp_path)) == config_from_hf(read_hf_config(hf_dir))


@pytest.mark.parametrize(
    "field, value",
    [
        ("attention_bias", True),
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
        ("sliding_window", 128),
        ("hidden_act", "gelu"),
        ("model_type", "gpt2"),
    ],
)
def test_inexpressible_configs_name_the_field(imported, field, value, tmp_path, capsys):
    _, hf_dir, _ = imported["llama"]
    hf = read_hf_config(hf_dir)
    hf[field] = value
    with pytest.raises(HFInteropError, match=field):
        config_from_hf(hf)
    if field == "attention_bias":  # and through the CLI: one line, exit status 1
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
        assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 1
        assert "attention_bias" in capsys.readouterr().err


def test_export_refuses_what_hf_cannot_express(imported):
    cfg = load_pretrained(imported["jamba"][2]).cfg
    cfg.residual.name = "momentum"
    with pytest.raises(HFInteropError, match="residual.name"):
        config_to_hf(cfg)
    cfg = load_pretrained(imported["llama"][2]).cfg
    cfg.pattern = "*-*E"  # neither Llama (all MLP) nor Mixtral (all MoE)
    with pytest.raises(HFInteropError, match="Mixtral"):
        config_to_hf(cfg)
    cfg.pattern = "M-*-*-M-"  # attention at layers 1, 2: no (period, offset)
    cfg.attention.rope = False
    with pytest.raises(HFInteropError, match="period/offset"):
        config_to_hf(cfg)


def test_training_continues_from_imported_weights(tmp_path, tiny_data):
    # Imported weights carry no data position or RNG state: training starts the data afresh
    # from step 0 with the imported model.
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**COMMON, "vocab_size": 300}, num_hidden_layers=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    assert main(["import-hf", str(tmp_path / "hf"), str(run)]) == 0
    overrides = [f"data.path={tiny_data}", f"trainer.run_dir={run}", "trainer.seq_len=32",
                 "trainer.max_steps=3", "trainer.micro_batch_size=2", "trainer.global_batch_size=2",
                 "optim.warmup_steps=1", "trainer.progress=false", "trainer.eval_batches=1"]  # fmt: skip
    assert main(["train", str(run / "config.yaml"), *overrides]) == 0
    assert verify_checkpoint(run / "checkpoints" / "step_00000003").step == 3


def test_a_family_is_one_adapter_class(imported):
    """What a new family's file holds: an adapter subclass registered for its model_type."""
    from arch.hf.base import register_family
    from arch.hf.llama import LlamaAdapter

    class MistralAdapter(LlamaAdapter):  # Llama's layers; its own name (sliding window: off)
        model_type = "mistral"
        architecture = "MistralForCausalLM"

        def exports(self, mixers: list[str], ffns: list[str]) -> bool:
            return False  # export keeps choosing Llama

    hf = {**read_hf_config(imported["llama"][1]), "model_type": "mistral", "sliding_window": None}
    with pytest.raises(HFInteropError, match="model_type"):
        config_from_hf(hf)
    register_family(MistralAdapter)
    try:
        assert config_from_hf(hf) == config_from_hf(read_hf_config(imported["llama"][1]))
    finally:
        del FAMILIES["mistral"]


def test_a_loaded_model_keeps_its_plugins_parameter_marks(imported):
    """`load_pretrained` builds on the meta device and materialises new Parameters; what a plugin
    marks on its parameters (Mamba's A_log and D: `_no_weight_decay`) must survive, or an
    optimizer built on the loaded model (fine-tuning) decays them and groups them differently."""
    from arch import build_model
    from trainer.optim import param_groups

    loaded = load_pretrained(imported["jamba"][2])
    fresh = build_model(loaded.cfg)

    def groups(model: torch.nn.Module) -> dict[str, list[str]]:
        names = {id(p): n for n, p in model.named_parameters()}
        return {
            g["group"]: sorted(names[id(p)] for p in g["params"]) for g in param_groups(model, 0.1)
        }

    assert any(n.endswith("A_log") for n in groups(fresh)["no_decay"])
    assert groups(loaded) == groups(fresh)
