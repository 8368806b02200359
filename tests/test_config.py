"""Config loading: defaults <- YAML recipe <- key=value overrides, validation, and CLI errors."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, run_cli
from omegaconf import OmegaConf

from arch import build_model, count_parameters
from arch.config import ModelConfig
from arch.registry import ConfigError, UserError
from launch.cli import main
from launch.config import CONFIGS_DIR, JobConfig, load_config, resolve_config_path, to_yaml

RECIPES = sorted(CONFIGS_DIR.glob("*.yaml"))

DESIGN_KEYS = [
    "trainer.run_dir",
    "trainer.max_steps",
    "trainer.seed",
    "trainer.checkpoint_every",
    "trainer.log_every",
    "trainer.micro_batch_size",
    "trainer.global_batch_size",
    "trainer.seq_len",
    "trainer.precision",
    "model.pattern",
    "model.d_model",
    "model.n_heads",
    "model.n_kv_heads",
    "model.vocab_size",
    "model.residual.name",
    "model.preconditioner.name",
    "model.attention.name",
    "optim.name",
    "optim.lr",
    "parallel.tensor",
    "parallel.pipeline",
    "parallel.zero_stage",
    "data.path",
]


def select(cfg, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# ---- loading and overrides --------------------------------------------------------------------


def test_defaults_load_and_validate():
    cfg = load_config(None, [])
    assert isinstance(cfg, JobConfig)
    assert isinstance(cfg.model, ModelConfig)
    assert cfg == JobConfig(data=cfg.data)  # only data.path differs: it is interpolated
    assert cfg.data.path == "runs/data/stdlib-byte-256"


def test_overrides_are_converted_to_the_field_types():
    cfg = load_config(
        None,
        [
            "trainer.max_steps=50",
            "optim.lr=1e-3",
            "trainer.progress=false",
            "model.n_kv_heads=2",
            "trainer.stop_at_step=10",
            "optim.betas=[0.8,0.99]",
            "trainer.precision=bf16",
            "model.attention.rope=false",
            "model.attention.window=64",
            "model.residual.options.alpha=0.5",
            "data.max_bytes=null",
        ],
    )
    assert cfg.trainer.max_steps == 50 and type(cfg.trainer.max_steps) is int
    assert cfg.optim.lr == pytest.approx(1e-3) and type(cfg.optim.lr) is float
    assert cfg.trainer.progress is False
    assert cfg.model.n_kv_heads == 2 and cfg.model.kv_heads == 2
    assert cfg.trainer.stop_at_step == 10
    assert list(cfg.optim.betas) == [0.8, 0.99]
    assert cfg.trainer.precision == "bf16"
    assert cfg.model.attention.rope is False and cfg.model.attention.window == 64
    assert dict(cfg.model.residual.options) == {"alpha": 0.5}
    assert cfg.data.max_bytes is None
    # Untouched neighbours keep their defaults.
    assert cfg.trainer.seq_len == 256 and cfg.model.attention.rope_theta == 10000.0


def test_integer_given_for_a_float_field_becomes_a_float():
    cfg = load_config(None, ["optim.lr=1"])
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 1.0


@pytest.mark.parametrize(
    ("recipe", "overrides", "expected"),
    [
        (None, [], "runs/data/stdlib-byte-256"),
        (None, ["trainer.seq_len=128"], "runs/data/stdlib-byte-128"),
        (
            None,
            ["data.dataset=files", "data.inputs=[/tmp]", "trainer.seq_len=64"],
            "runs/data/files-byte-64",
        ),
        ("tiny", [], "runs/data/stdlib-byte-tiny-64"),
        ("tiny", ["trainer.seq_len=32"], "runs/data/stdlib-byte-tiny-32"),
        ("tiny", ["data.path=/somewhere/else", "trainer.seq_len=32"], "/somewhere/else"),
    ],
)
def test_data_path_interpolates_the_sequence_length(recipe, overrides, expected):
    assert load_config(recipe, overrides).data.path == expected


def test_recipe_then_overrides_take_precedence():
    cfg = load_config("tiny", ["model.d_model=32", "trainer.max_steps=12"])
    assert cfg.model.d_model == 32  # override beats the recipe
    assert cfg.trainer.max_steps == 12
    assert cfg.model.pattern == "*-*-"  # recipe beats the defaults
    assert cfg.trainer.micro_batch_size == 4
    assert cfg.optim.weight_decay == 0.1  # defaults fill the rest


def test_recipe_names_and_paths_resolve_to_the_same_file():
    tiny = (CONFIGS_DIR / "tiny.yaml").resolve()
    for name in ("tiny", "tiny.yaml", str(tiny), str(tiny.relative_to(REPO))):
        assert resolve_config_path(name).resolve() == tiny
    assert load_config("tiny", []) == load_config(str(tiny), [])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_validates_and_keeps_its_values(recipe):
    cfg = load_config(str(recipe), [])
    assert load_config(recipe.stem, []) == cfg
    structured = OmegaConf.structured(cfg)
    raw = yaml.safe_load(recipe.read_text())
    checked = 0
    for key, value in leaves(raw):
        if isinstance(value, str) and "${" in value:
            continue  # interpolations are resolved; checked above for data.path
        assert OmegaConf.select(structured, key) == value, key
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_resolved_yaml_round_trips(recipe, tmp_path):
    cfg = load_config(str(recipe), ["trainer.max_steps=7777"])
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(to_yaml(cfg))
    assert load_config(str(dumped), []) == cfg


@pytest.mark.parametrize("key", DESIGN_KEYS)
def test_design_field_names_exist(key):
    cfg = load_config(None, [])
    select(cfg, key)  # AttributeError if the field was renamed
    schema = OmegaConf.structured(JobConfig)
    assert OmegaConf.select(schema, key, default="<missing>") != "<missing>"
    # and each one is a real dataclass field (not a derived property)
    parent_key, _, leaf = key.rpartition(".")
    parent = select(cfg, parent_key)
    assert leaf in {f.name for f in dataclasses.fields(parent)}


# ---- bad input, in process: ConfigError names the key ------------------------------------------


PP2_V2 = ["launch.nproc_per_node=2", "parallel.pipeline=2", "parallel.virtual_stages=2"]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.foo=1"], "model.foo"),
        (["foo=1"], "foo"),
        (["trainer.bar.baz=1"], "trainer.bar"),
        (["trainer.max_steps=abc"], "trainer.max_steps"),
        (["trainer.max_steps=1.5"], "trainer.max_steps"),
        (["trainer.progress=maybe"], "trainer.progress"),
        (["model.n_heads=3"], "model.n_heads"),
        (["model.n_heads=0"], "model.n_heads"),
        (["model.d_model=0"], "model.d_model"),
        (["model.n_kv_heads=3"], "model.n_kv_heads"),
        (["model.d_model=36"], "model.attention.rope"),  # head_dim 9: RoPE needs it even
        (["model.vocab_size=100"], "model.vocab_size"),
        (["model.symbols.A=nope"], "model.symbols"),
        (["model.pattern=*X"], "model.pattern"),
        (["model.pattern=*-|"], "model.pattern"),
        (["model.pattern="], "model.pattern"),
        (["trainer.max_steps=*5"], "trainer.max_steps"),
        (["model.residual.name=nope"], "model.residual.name"),
        (["model.attention.name=nope"], "model.attention.name"),
        (["model.preconditioner.name=nope"], "model.preconditioner.name"),
        (["optim.name=nope"], "optim.name"),
        (["optim.scheduler=nope"], "optim.scheduler"),
        (["data.tokenizer=nope"], "data.tokenizer"),
        (["data.dataset=nope"], "data.dataset"),
        (["trainer.global_batch_size=12"], "trainer.global_batch_size"),
        (["trainer.precision=fp8"], "trainer.precision"),
        (["trainer.max_steps=0"], "trainer.max_steps"),
        (["trainer.seq_len=-1"], "trainer.seq_len"),
        (["trainer.micro_batch_size=0"], "trainer.micro_batch_size"),
        (["trainer.log_every=0"], "trainer.log_every"),
        (["trainer.eval_every=-1"], "trainer.eval_every"),
        (["trainer.checkpoint_every=-1"], "trainer.checkpoint_every"),
        (["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints"),
        (["trainer.stop_at_step=0"], "trainer.stop_at_step"),
        (["trainer.stop_at_step=301"], "trainer.stop_at_step"),
        (["optim.lr=0"], "optim.lr"),
        (["optim.warmup_steps=-1"], "optim.warmup_steps"),
        (["optim.betas=[0.9]"], "optim.betas"),
        (["optim.betas=[0.9,1.0]"], "optim.betas"),
        (["optim.min_lr_ratio=2"], "optim.min_lr_ratio"),
        (["optim.decay_fraction=-0.1"], "optim.decay_fraction"),
        (["optim.grad_clip=-1"], "optim.grad_clip"),
        (["parallel.zero_stage=4"], "parallel.zero_stage"),
        (["parallel.zero_stage=3", "parallel.pipeline=2"], "parallel.zero_stage"),
        (["parallel.tensor=3"], "parallel.tensor"),
        (["parallel.recompute=partial"], "parallel.recompute"),
        (["parallel.pipeline=99"], "parallel.pipeline"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),  # needs tp > 1
        (["launch.nproc_per_node=2", "parallel.expert=2"], "parallel.expert"),  # no experts
        (
            ["launch.nproc_per_node=2", "parallel.expert=3", "model.pattern=*E"],
            "parallel.expert",
        ),  # 3 does not divide dp 2
        (
            [
                "launch.nproc_per_node=2",
                "parallel.expert=2",
                "model.pattern=*E",
                "model.moe.num_experts=3",
            ],
            "parallel.expert",
        ),
        (
            [
                "launch.nproc_per_node=2",
                "parallel.expert=2",
                "model.pattern=*E",
                "parallel.zero_stage=3",
            ],
            "parallel.zero_stage",
        ),
        (
            [
                "launch.nproc_per_node=2",
                "parallel.tensor=2",
                "parallel.sequence_parallel=true",
                "trainer.seq_len=63",
            ],
            "trainer.seq_len",
        ),  # fmt: skip
        (["data.eval_fraction=0"], "data.eval_fraction"),
        (["data.shard_size_bytes=100"], "data.shard_size_bytes"),
        (["data.max_bytes=0"], "data.max_bytes"),
        (["data.num_workers=-1"], "data.num_workers"),
        (["launch.nproc_per_node=0"], "launch.nproc_per_node"),
        (["parallel.tensor=2"], "launch.nproc_per_node"),  # 2 ranks needed, 1 asked for
        (["launch.nproc_per_node=2", "parallel.tensor=2", "model.n_kv_heads=1"], "parallel.tensor"),
        (["launch.nproc_per_node=2", "optim.name=muon"], "optim.name"),
        (
            ["launch.nproc_per_node=2", "parallel.pipeline=2", "model.pattern=*-|*-|*-"],
            "parallel.pipeline",
        ),
        (["launch.nproc_per_node=3"], "trainer.global_batch_size"),
        (["parallel.virtual_stages=0"], "parallel.virtual_stages"),
        (["launch.nproc_per_node=2", "parallel.virtual_stages=2"], "parallel.virtual_stages"),
        (  # interleaving cuts the pattern into pp x virtual_stages chunks: 4 parts, not 2
            [*PP2_V2, "model.pattern=*-|*-"],
            "parallel.virtual_stages",
        ),
        ([*PP2_V2, "model.pattern=*-*"], "parallel.virtual_stages"),  # 4 chunks, 3 sub-layers
        (  # 3 micro-batches a step cannot go round 2 stages in groups of 2
            [*PP2_V2, "trainer.global_batch_size=6", "trainer.micro_batch_size=2"],
            "trainer.global_batch_size",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_config_error_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.key == key
    assert str(err.value).startswith(f"config key '{key}': ")
    assert "\n" not in str(err.value)


def test_yaml_recipe_errors_name_the_key(tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trainer:\n  foo: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(unknown), [])
    assert err.value.key == "trainer.foo"
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text("trainer:\n  max_steps: abc\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(wrong_type), [])
    assert err.value.key == "trainer.max_steps"


def test_user_errors_for_files_and_syntax(tmp_path):
    with pytest.raises(UserError, match="not found") as err:
        load_config(str(tmp_path / "missing.yaml"), [])
    assert not isinstance(err.value, ConfigError)
    assert "default" in str(err.value) and "tiny" in str(err.value)  # lists the recipes
    with pytest.raises(UserError, match="not key=value"):
        load_config(None, ["trainer.max_steps"])
    with pytest.raises(UserError, match="not key=value"):
        load_config(None, ["=5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad), [])


# A recipe the YAML parser rejects: where (file:line:column) and the parser's problem.
YAML_ERRORS = {
    "indentation": (
        "trainer:\n  max_steps: 5\n   seed: 3\n",
        3,
        8,
        "mapping values are not allowed",
    ),
    "unclosed_list": ("optim:\n  betas: [0.9, 0.95\ntrainer:\n  seed: 1\n", 3, 8, "expected ','"),
    "duplicate_key": ("trainer:\n  seed: 1\n  seed: 2\n", 3, 3, "duplicate key seed"),
    "alias": ("model:\n  pattern: *-*-\n", 2, 14, "while scanning an alias"),
    "tab": ("trainer:\n\tseed: 1\n", 2, 1, "tab"),
}


@pytest.mark.parametrize("case", list(YAML_ERRORS))
def test_yaml_syntax_errors_say_file_line_and_column(case, tmp_path):
    text, line, column, problem = YAML_ERRORS[case]
    recipe = tmp_path / f"{case}.yaml"
    recipe.write_text(text)
    with pytest.raises(UserError) as err:
        load_config(str(recipe), [])
    message = str(err.value)
    assert err.value.exit_code == 2
    assert message.startswith(f"{recipe}:{line}:{column}: not valid YAML: "), message
    assert problem in message and "\n" not in message


@pytest.mark.parametrize(
    ("text", "got"),
    [("- 1\n- 2\n", "got a list"), ("hello\n", "got the value 'hello'"), ("5\n", "value '5'")],
    ids=["list", "string", "number"],
)
def test_recipe_that_is_not_a_mapping_says_what_it_is(tmp_path, text, got):
    recipe = tmp_path / "flat.yaml"
    recipe.write_text(text)
    with pytest.raises(UserError) as err:
        load_config(str(recipe), [])
    assert err.value.exit_code == 2
    message = str(err.value)
    assert message.startswith(f"{recipe} must be a YAML mapping of config groups (model:, ")
    assert message.endswith(got) and "\n" not in message


def test_empty_recipe_means_the_defaults(tmp_path):
    for text in ("", "# nothing yet\n", "null\n"):
        recipe = tmp_path / "empty.yaml"
        recipe.write_text(text)
        assert load_config(str(recipe), []) == load_config(None, [])


def test_unreadable_recipes_are_one_line(tmp_path):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="is not UTF-8 text") as err:
        load_config(str(binary), [])
    assert err.value.exit_code == 2
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    with pytest.raises(UserError, match="cannot read recipe .*folder.yaml: Is a directory"):
        load_config(str(folder), [])


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("trainer:\n  seed: 1\n   max_steps: 3\n", ":3:13: not valid YAML: mapping values"),
        ("- trainer\n", "must be a YAML mapping of config groups"),
        (None, "not found; give a YAML path or a recipe name"),
    ],
    ids=["syntax", "not_a_mapping", "missing"],
)
def test_cli_recipe_problems_are_one_line_exit_2(tmp_path, capsys, text, needle):
    recipe = tmp_path / "recipe.yaml"
    if text is not None:
        recipe.write_text(text)
    assert main(["train", str(recipe), "trainer.max_steps=5", "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(
        f"hybridtron train: error: {'config file' if text is None else recipe}"
    )
    assert needle in lines[0]


# ---- a warm-up that is not shorter than the run: shortened, said, recorded --------------------


def test_default_warmup_in_a_short_run_is_shortened_with_one_note(capsys):
    notes: list[str] = []
    cfg = load_config(None, ["trainer.max_steps=5"], note=notes.append)  # default warm-up 20
    assert cfg.optim.warmup_steps == 4
    assert "warmup_steps: 4" in to_yaml(cfg)  # what config.yaml records, and the run uses
    assert len(notes) == 1
    assert "optim.warmup_steps=20" in notes[0] and "trainer.max_steps=5" in notes[0]
    assert "over 4 steps" in notes[0]
    # By default the note goes to stderr, on one line, before anything runs.
    load_config("tiny", ["trainer.max_steps=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "[config] optim.warmup_steps=5 is not shorter than trainer.max_steps=3: warming up over "
        "2 steps instead (recorded as optim.warmup_steps=2)"
    ]


@pytest.mark.parametrize(
    ("overrides", "warmup"),
    [
        (["trainer.max_steps=1"], 0),
        (["trainer.max_steps=20"], 19),
        (["trainer.max_steps=21"], 20),  # shorter already: as asked
        (["trainer.max_steps=6", "optim.warmup_steps=6", "optim.scheduler=wsd"], 5),
        (["trainer.max_steps=6", "optim.warmup_steps=0", "optim.scheduler=constant"], 0),
    ],
)
def test_warmup_clamp_values(overrides, warmup):
    notes: list[str] = []
    assert load_config(None, overrides, note=notes.append).optim.warmup_steps == warmup
    assert len(notes) == (0 if warmup in (20, 0) and "trainer.max_steps=1" not in overrides else 1)


def test_a_clamped_config_loads_again_unchanged(tmp_path):
    # The resolved config.yaml of a clamped run (what Ray workers and resumes read) is stable.
    cfg = load_config(None, ["trainer.max_steps=5"], note=None)
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    notes: list[str] = []
    assert load_config(str(saved), [], note=notes.append) == cfg and notes == []


@pytest.mark.parametrize("pattern", ["*-*-", "*-", "**--", "*-|*-", "-*"])
def test_pattern_overrides_starting_with_star_are_taken_as_strings(pattern):
    # '*' starts a YAML alias: such values are not YAML, and must still mean the pattern.
    assert load_config(None, [f"model.pattern={pattern}"]).model.pattern == pattern


# Former library bugs found by these tests (fixed; kept as regression tests).


def test_section_replaced_by_a_scalar_names_the_section():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model=3"])
    assert err.value.key == "model"


def test_recipe_that_is_not_a_mapping_is_a_user_error(tmp_path):
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- 1\n- 2\n")
    with pytest.raises(UserError):
        load_config(str(recipe), [])


def test_negative_ffn_hidden_is_a_config_error():
    # Accepted by load_config; `train --dry-run` then dies in nn.Linear with a traceback.
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.ffn_hidden=-5"])
    assert err.value.key == "model.ffn_hidden"


# ---- bad input through main() in process (cheap), then the real CLI in subprocesses -----------


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["train", "trainer.global_batch_size=12"], 2, "trainer.global_batch_size"),
        (["train", "trainer.precision=fp8"], 2, "trainer.precision"),
        (["train", "model.residual.name=nope"], 2, "model.residual.name"),
        (["train", "tiny", "parallel.tensor=3", "--dry-run"], 2, "parallel.tensor"),
        (["train", "model.pattern=*-X-", "--dry-run"], 2, "model.pattern"),
        (["prepare-data", "data.dataset=nope"], 2, "data.dataset"),
        (["train", "tiny", "trainer.seed"], 2, "'trainer.seed'"),
    ],
)
def test_main_reports_one_line_and_exit_code(args, code, needle, capsys):
    assert main(args) == code
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"hybridtron {args[0]}: error: ")
    assert needle in lines[0]


# One subprocess per case, two at a time: each costs ~3 s of imports.
CLI_CASES = {
    "unknown_key": (["train", "model.foo=1"], 2, "'model.foo'"),
    "wrong_type": (["train", "tiny", "trainer.max_steps=abc"], 2, "'trainer.max_steps'"),
    "impossible": (["train", "model.n_heads=3"], 2, "'model.n_heads'"),
    "missing_file": (["train", "no-such-recipe.yaml", "trainer.max_steps=5"], 2, "no-such-recipe"),
    "malformed": (["train", "tiny", "trainer.max_steps"], 2, "'trainer.max_steps'"),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    dry_dir = tmp_path_factory.mktemp("dry") / "run"
    dry_args = [
        "train",
        "tiny",
        "trainer.max_steps=7",
        "model.d_model=32",
        "trainer.seq_len=48",
        "optim.scheduler=wsd",
        f"trainer.run_dir={dry_dir}",
        "--dry-run",
    ]
    commands = {name: args for name, (args, _, _) in CLI_CASES.items()}
    commands["dry_run"] = dry_args
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_cli, *args) for name, args in commands.items()}
        results = {name: f.result() for name, f in futures.items()}
    return results, dry_dir, dry_args


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_is_one_clean_line(case, cli_runs):
    results, _, _ = cli_runs
    args, code, needle = CLI_CASES[case]
    proc = results[case]
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hybridtron train: error: ")
    assert needle in lines[0]
    assert proc.stdout == ""


def test_dry_run_prints_the_resolved_config_and_parameter_count(cli_runs):
    results, dry_dir, dry_args = cli_runs
    proc = results["dry_run"]
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)  # the parameter-count line is a YAML comment
    assert printed["trainer"]["max_steps"] == 7
    assert printed["model"]["d_model"] == 32
    assert printed["model"]["pattern"] == "*-*-"  # from the recipe
    assert printed["optim"]["scheduler"] == "wsd"
    assert printed["trainer"]["run_dir"] == str(dry_dir)
    assert printed["data"]["path"] == "runs/data/stdlib-byte-tiny-48"
    assert set(printed) == {"model", "data", "optim", "trainer", "parallel", "launch", "cluster"}
    # The printed YAML is the same config load_config gives.
    cfg = load_config("tiny", [a for a in dry_args[2:] if "=" in a])
    assert printed == OmegaConf.to_container(OmegaConf.structured(cfg))
    count, layout = proc.stdout.strip().splitlines()[-2:]
    with torch.device("meta"):
        n = count_parameters(build_model(cfg.model))
    assert count == f"# parameters: {n:,} ({n / 1e6:.2f}M)"
    # The largest rank's state, from its shard built on the meta device (one process: all).
    assert layout.startswith("# layout tp 1 x pp 1 x dp 1 (ep 1, ZeRO 0): 1 rank role;")
    assert f"holds {n:,} parameters" in layout and "Warning" not in proc.stderr
    assert not dry_dir.exists() and not dry_dir.parent.joinpath("run").exists()
    assert not Path(REPO, "runs/data/stdlib-byte-tiny-48").exists()


def test_pattern_symbol_without_a_registered_plugin_is_a_config_error():
    # A symbol of the table whose plugin is not registered must fail at validation, before any
    # data is prepared, not later when the model is built.
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.pattern=*-", "model.symbols={-: no_such_ffn}"])
    assert err.value.key == "model.pattern"
    assert "no_such_ffn" in str(err.value)


def test_launch_storage_s3_puts_the_checkpoints_in_the_store():
    """launch.storage=s3://...: the run directory stays (node-local), the checkpoints go to
    <storage>/<run name>/checkpoints; an explicit s3:// checkpoint_dir wins, a local one is a
    contradiction; other schemes and a missing bucket are one line each."""
    base = ["trainer.run_dir=runs/exp1"]
    cfg = load_config(None, [*base, "launch.storage=s3://bkt/team/"], note=None)
    assert cfg.trainer.run_dir == "runs/exp1"
    assert cfg.trainer.checkpoint_dir == "s3://bkt/team/exp1/checkpoints"
    mine = "trainer.checkpoint_dir=s3://other/x"
    cfg = load_config(None, [*base, "launch.storage=s3://bkt/team", mine], note=None)
    assert cfg.trainer.checkpoint_dir == "s3://other/x"
    for overrides, pattern in (
        (["launch.storage=s3://bkt", "trainer.checkpoint_dir=/local"], "contradicts"),
        (["launch.storage=s3:///prefix"], "launch.storage.*names no bucket.*s3://bucket/prefix"),
        (["launch.storage=gs://bkt/x"], "launch.storage.*gs:// is not supported"),
        (["trainer.checkpoint_dir=gs://bkt/x"], "trainer.checkpoint_dir.*s3://bucket/prefix"),
    ):
        with pytest.raises(ConfigError, match=pattern) as info:
            load_config(None, [*base, *overrides], note=None)
        assert "\n" not in str(info.value)
