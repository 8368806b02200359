"""The plugin registry: in-tree registration, lookups, errors, and out-of-tree entry points."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import math
import os
import shutil
import sys
import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_SEQ_LEN, run_cli

from arch import RESIDUALS, ModelConfig, build_model
from arch.registry import ConfigError, Registry, RegistryError, UserError

DEMO_MODULE = "hybridtron_demo_plugin"
BROKEN_MODULE = "hybridtron_broken_plugin"

DEMO_PLUGIN_SOURCE = '''\
"""A residual plugin that lives outside hybridtron (test fixture)."""

from arch.residual import ResidualUpdate


class HalfResidual(ResidualUpdate):
    """Half-step residual (demo plugin).

    x <- x + 0.5 * f(norm(x)); registered only through the entry point, never on import.
    """

    def forward(self, state, oracle):
        x = state["x"]
        return {**state, "x": x + 0.5 * oracle(x)}
'''


def write_distribution(root: Path, name: str, entry_points: str) -> None:
    """A minimal installed distribution: what importlib.metadata finds on sys.path."""
    dist_info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(textwrap.dedent(entry_points).lstrip())


def write_module(root: Path, module: str, source: str) -> None:
    (root / module).mkdir(parents=True)
    (root / module / "__init__.py").write_text(textwrap.dedent(source))


def with_pythonpath(path: Path) -> dict:
    extra = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{path}{os.pathsep}{extra}" if extra else str(path)}


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


# ---- in-tree semantics, on throwaway registries ---------------------------------------------


@pytest.fixture
def registry():
    """A fresh registry of a unique kind, removed from the global table afterwards."""
    kind = f"testkind_{uuid.uuid4().hex[:8]}"
    reg = Registry(kind, "throwaway registry for tests")
    yield reg
    Registry._all.pop(kind, None)


def test_decorator_registers_and_returns_the_object(registry):
    @registry.register("alpha")
    class Alpha:
        """Alpha plugin."""

    @registry.register("beta")
    def beta():
        """Beta plugin."""

    assert Alpha.__name__ == "Alpha" and callable(beta)  # decorator returns the object itself
    assert registry.get("alpha") is Alpha
    assert registry.get("beta") is beta
    assert "alpha" in registry and "gamma" not in registry
    assert registry.entry_point_group == f"hybridtron.{registry.kind}"
    assert registry.kind in Registry.all()
    assert list(Registry.all()) == sorted(Registry.all())


def test_unknown_name_lists_the_known_names_and_the_entry_point_group(registry):
    registry.add("zeta", object())
    registry.add("alpha", object())
    with pytest.raises(RegistryError) as err:
        registry.get("nope")
    message = str(err.value)
    assert "'nope'" in message
    assert "choose one of: alpha, zeta" in message
    assert f"hybridtron.{registry.kind}" in message
    assert isinstance(err.value, UserError) and err.value.exit_code == 2


def test_duplicate_registration_raises_and_override_replaces(registry):
    @registry.register("same")
    def first():
        """First."""

    with pytest.raises(RegistryError, match="registered twice"):

        @registry.register("same")
        def second():
            """Second."""

    assert registry.get("same") is first  # the failed registration changed nothing

    @registry.register("same", override=True)
    def third():
        """Third."""

    assert registry.get("same") is third
    registry.add("same", third)  # re-adding the very same object is harmless
    assert registry.get("same") is third


def test_names_and_items_are_sorted(registry):
    for name in ("mango", "apple", "zucchini", "banana"):
        registry.add(name, name.upper())
    assert registry.names() == ["apple", "banana", "mango", "zucchini"]
    assert list(registry.items()) == [
        ("apple", "APPLE"),
        ("banana", "BANANA"),
        ("mango", "MANGO"),
        ("zucchini", "ZUCCHINI"),
    ]


def test_a_kind_can_only_have_one_registry(registry):
    with pytest.raises(RegistryError, match=registry.kind):
        Registry(registry.kind, "again")
    with pytest.raises(RegistryError, match="residual"):
        Registry("residual", "a second residual registry")
    assert Registry.all()["residual"] is RESIDUALS


def test_doc_line():
    class Multi:
        """
        First line of the summary.

        More detail that `registry list` does not print.
        """

    class Undocumented:
        pass

    def fn():
        """A function plugin."""

    assert Registry.doc_line(Multi) == "First line of the summary."
    assert Registry.doc_line(Undocumented) == "(no description)"
    assert Registry.doc_line(fn) == "A function plugin."
    assert Registry.doc_line(RESIDUALS.get("plain")).startswith("x <- x + f(norm(x))")


def test_config_error_carries_the_key():
    err = ConfigError("model.d_model", "must be positive")
    assert err.key == "model.d_model"
    assert str(err) == "config key 'model.d_model': must be positive"
    assert isinstance(err, UserError) and err.exit_code == 2
    assert UserError("x").exit_code == 1


# ---- entry points, in process (unique groups, so nothing leaks into the real registries) ----


@pytest.fixture
def entry_point_dir(tmp_path, monkeypatch):
    """sys.path + a distribution declaring plugins for two unique registry kinds."""
    uid = uuid.uuid4().hex[:8]
    kinds = {"ok": f"test_ep_ok_{uid}", "broken": f"test_ep_broken_{uid}"}
    mods = {k: f"hybridtron_test_{k}_{uid}" for k in ("obj", "selfreg", "broken")}
    write_module(
        tmp_path,
        mods["obj"],
        '''
        def thing():
            """An object plugin named by its entry point."""
        ''',
    )
    write_module(
        tmp_path,
        mods["selfreg"],
        f'''
        from arch.registry import Registry

        def helper():
            """Registered by the module itself on import."""

        Registry.all()["{kinds["ok"]}"].add("self_registered", helper)
        ''',
    )
    write_module(
        tmp_path,
        mods["broken"],
        """
        import hybridtron_dependency_that_is_not_installed  # noqa: F401
        """,
    )
    write_distribution(
        tmp_path,
        f"hybridtron-test-plugins-{uid}",
        f"""
        [hybridtron.{kinds["ok"]}]
        thing = {mods["obj"]}:thing
        module_style = {mods["selfreg"]}

        [hybridtron.{kinds["broken"]}]
        kaputt = {mods["broken"]}:Broken
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    registries = {k: Registry(kind, f"test kind {k}") for k, kind in kinds.items()}
    yield registries, mods
    for kind in kinds.values():
        Registry._all.pop(kind, None)
    for mod in mods.values():
        sys.modules.pop(mod, None)


def test_entry_points_are_loaded_lazily(entry_point_dir):
    registries, mods = entry_point_dir
    reg = registries["ok"]
    assert mods["obj"] not in sys.modules  # nothing imported before the first lookup
    thing = reg.get("thing")
    assert thing.__module__ == mods["obj"]
    # A module-style entry point registers what it wants; the module itself is not a plugin.
    assert reg.names() == ["self_registered", "thing"]
    assert (
        Registry.doc_line(reg.get("self_registered"))
        == "Registered by the module itself on import."
    )


def test_broken_plugin_names_itself_and_its_group(entry_point_dir):
    registries, mods = entry_point_dir
    reg = registries["broken"]
    with pytest.raises(RegistryError) as err:
        reg.get("anything")
    message = str(err.value)
    assert "'kaputt'" in message
    assert f"'hybridtron.{reg.kind}'" in message
    assert f"{mods['broken']}:Broken" in message
    assert "hybridtron_dependency_that_is_not_installed" in message  # the underlying cause
    assert isinstance(err.value.__cause__, ImportError)


# ---- the demo residual plugin: a real out-of-tree package -----------------------------------


@pytest.fixture(scope="module")
def demo_plugin_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_plugin")
    (root / DEMO_MODULE).mkdir()
    (root / DEMO_MODULE / "__init__.py").write_text(DEMO_PLUGIN_SOURCE)
    write_distribution(
        root,
        "hybridtron-demo-plugin",
        f"[hybridtron.residual]\nhalf = {DEMO_MODULE}:HalfResidual\n",
    )
    return root


@pytest.fixture(scope="module")
def broken_plugin_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("broken_plugin")
    write_module(root, BROKEN_MODULE, "raise ImportError('needs torch_nightly_special')\n")
    write_distribution(
        root, "hybridtron-broken-plugin", f"[hybridtron.residual]\nbroken = {BROKEN_MODULE}:Nope\n"
    )
    return root


@pytest.fixture(scope="module")
def plugin_cli(tmp_path_factory, tiny_data, demo_plugin_dir, broken_plugin_dir):
    """The real CLI with the plugins on PYTHONPATH, three runs two at a time."""
    work = tmp_path_factory.mktemp("plugin_cli")
    # A private copy of the data: a streaming dataset still open on tiny_data in this
    # process (other test modules train in-process) would make the child's reuse it.
    data = work / "data"
    shutil.copytree(tiny_data, data)
    run_dir = work / "run"
    jobs = {
        "list": (("registry", "list", "residual"), demo_plugin_dir),
        "train": (
            (
                "train",
                "configs/tiny.yaml",
                "model.residual.name=half",
                "trainer.max_steps=2",
                "optim.warmup_steps=1",
                f"trainer.seq_len={TINY_SEQ_LEN}",
                f"data.path={data}",
                f"trainer.run_dir={run_dir}",
                "trainer.progress=false",
                "trainer.log_every=1",
            ),
            demo_plugin_dir,
        ),
        "broken": (("registry", "list", "residual"), broken_plugin_dir),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            key: pool.submit(run_cli, *args, env=with_pythonpath(path))
            for key, (args, path) in jobs.items()
        }
        results = {key: f.result() for key, f in futures.items()}
    return results, run_dir


def test_cli_lists_the_plugin_with_its_doc_line(plugin_cli):
    results, _ = plugin_cli
    proc = results["list"]
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("residual: ") and "hybridtron.residual" in lines[0]
    entries = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
    # A residual subclass inherits the all-replicated tensor-parallel plan.
    assert entries["half"] == "Half-step residual (demo plugin).  [tp: none (replicated)]"
    assert entries["plain"].startswith("x <- x + f(norm(x))")


def test_cli_trains_with_the_plugin(plugin_cli):
    results, run_dir = plugin_cli
    proc = results["train"]
    assert proc.returncode == 0, proc.stderr
    assert "Done: step 2/2" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in train_rows)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["residual"]["name"] == "half"
    ckpt_cfg = yaml.safe_load(
        (run_dir / "checkpoints" / "step_00000002" / "config.yaml").read_text()
    )
    assert ckpt_cfg["model"]["residual"]["name"] == "half"


def test_cli_reports_a_broken_plugin_in_one_line(plugin_cli):
    results, _ = plugin_cli
    proc = results["broken"]
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert line.startswith("hybridtron registry: error: ")
    assert "'broken'" in line
    assert "'hybridtron.residual'" in line
    assert "needs torch_nightly_special" in line


def test_plugin_forward_is_what_the_model_runs(demo_plugin_dir, monkeypatch):
    """Discover the demo plugin's entry point in process and check the block really uses it."""
    RESIDUALS.load_entry_points()  # done now, without the plugin: `half` must not leak globally
    monkeypatch.syspath_prepend(str(demo_plugin_dir))
    importlib.invalidate_caches()
    eps = [ep for ep in importlib.metadata.entry_points(group=RESIDUALS.entry_point_group)]
    half = [ep for ep in eps if ep.name == "half"]
    assert len(half) == 1, eps
    assert half[0].dist is not None and half[0].dist.name == "hybridtron-demo-plugin"
    name = f"half_test_{uuid.uuid4().hex[:8]}"
    try:
        plugin = half[0].load()
        RESIDUALS.add(name, plugin)
        assert Registry.doc_line(RESIDUALS.get(name)) == "Half-step residual (demo plugin)."

        base = ModelConfig(pattern="*-", d_model=32, n_heads=4, n_kv_heads=2)
        plain = build_model(base, seed=0).eval()
        cfg = ModelConfig(pattern="*-", d_model=32, n_heads=4, n_kv_heads=2)
        cfg.residual.name = name
        halved = build_model(cfg, seed=0).eval()
        assert all(type(layer.residual) is plugin for layer in halved.layers)
        halved.load_state_dict(plain.state_dict())  # identical weights: only the update differs

        ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert not torch.allclose(plain(ids), halved(ids), atol=1e-5)
            # One sub-layer: exactly x + 0.5 * f(norm(x)).
            layer = halved.layers[0]
            x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
            expected = x + 0.5 * layer.inner(layer.norm(x))
            torch.testing.assert_close(layer({"x": x})["x"], expected)
    finally:
        RESIDUALS._items.pop(name, None)
        sys.modules.pop(DEMO_MODULE, None)
    assert "half" not in RESIDUALS._items
