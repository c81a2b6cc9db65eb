"""Every YAML in conf/ composes and instantiates (parametrised over the files, so new ones are covered)."""

import re

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from balance.run import build_model_config, check_run_options
from compose import CONF_DIR, compose_train

# Data each model config is built for (a new model config is tested with avdigits unless listed here).
MODEL_DATA = {"mlp": "synthetic", "small_cnn": "synthetic", "easy_vqa": "easy_vqa", "iemocap": "iemocap",
              "food101": "food101", "mvsa": "mvsa", "mosei": "mosei", "ucf101": "ucf101"}


def _compose(overrides: list[str], run_dir=None):
    """compose_train, with a placeholder root for data sets that require one (constructors read no files).

    The placeholder is set on the composed config rather than composed again: composing is most of these tests'
    time, and a plain value set afterwards is what the same override would give."""
    cfg = compose_train(overrides, run_dir=run_dir)
    if OmegaConf.is_missing(cfg.data, "root"):
        cfg.data.root = "/nonexistent/data"
    return cfg


def _configs(group: str, nested: bool = False) -> list[str]:
    files = (CONF_DIR / group).rglob("*.yaml") if nested else (CONF_DIR / group).glob("*.yaml")
    return sorted(str(p.relative_to(CONF_DIR / group).with_suffix("")) for p in files)


def _all_yaml() -> list[str]:
    return sorted(str(p.relative_to(CONF_DIR)) for p in CONF_DIR.rglob("*.yaml"))


def test_every_yaml_is_covered():
    covered = {"train.yaml"}
    for group in ("data", "model", "model/fusion", "model/mmtm", "method", "optimizer", "scheduler", "trainer",
                  "logger", "callbacks", "diagnostics"):
        covered |= {f"{group}/{name}.yaml" for name in _configs(group)}
    covered |= {f"experiment/{name}.yaml" for name in _configs("experiment", nested=True)}
    covered |= {f"recipe/{name}.yaml" for name in _configs("recipe")}  # see test_every_recipe_is_used
    covered |= {f"reproduce/{name}.yaml" for name in _configs("reproduce")}  # tables: tests/test_reproduce.py
    covered |= {f"hparams_search/{name}.yaml" for name in _configs("hparams_search")}  # tests/test_sweeps.py
    covered |= {f"hydra/sweeper/{name}.yaml" for name in _configs("hydra/sweeper")}  # tests/test_sweeps.py
    covered |= {f"hydra/launcher/{name}.yaml" for name in _configs("hydra/launcher")}  # tests/test_launchers.py
    assert set(_all_yaml()) <= covered, set(_all_yaml()) - covered


class _FakeData:
    """What build_model_config reads from a datamodule, without loading any data."""

    def __init__(self, datamodule_cfg):
        dm = instantiate(datamodule_cfg)
        self.modalities, self.num_classes = dm.modalities, dm.num_classes
        # What the data fills in for some encoders: a vocabulary size (text), a feature size (sequences).
        self.encoder_kwargs = {m: {"vocab_size": 50, "in_dim": 8} for m in self.modalities}


@pytest.mark.parametrize("name", _configs("data"))
def test_data_config_instantiates(name):
    cfg = _compose([f"data={name}"])
    check_run_options(cfg)
    dm = instantiate(cfg.data)
    assert len(dm.modalities) >= 2 and dm.num_classes >= 2


@pytest.mark.parametrize("name", _configs("model"))
def test_model_config_instantiates(name):
    data = MODEL_DATA.get(name, "avdigits")
    cfg = _compose([f"data={data}", f"model={name}"])
    fake = _FakeData(cfg.data)
    model = instantiate(build_model_config(cfg, fake))
    assert model.modalities == list(fake.modalities)
    assert model.num_classes == fake.num_classes


@pytest.mark.parametrize("name", _configs("model/fusion"))
def test_fusion_config_runs(name):
    cfg = _compose(["data=synthetic", "model=mlp", f"model/fusion={name}"])
    model = instantiate(build_model_config(cfg, _FakeData(cfg.data)))
    inputs = {m: torch.randn(5, cfg.data.feature_dim) for m in cfg.data.modalities}
    assert model(inputs).shape == (5, cfg.data.num_classes)


# Values for the options a method requires (``???`` in its config); building reads no files.
REQUIRED_VALUES = {"modality": "audio", "teachers": {"audio": "/runs/audio_only", "visual": "/runs/visual_only"}}


def _with_required(overrides: list[str], run_dir=None):
    """``_compose(overrides)``, with a value for each method option the configs leave required."""
    cfg = _compose(overrides, run_dir=run_dir)
    for key in [key for key in cfg.method.keys() if OmegaConf.is_missing(cfg.method, key)]:
        cfg.method[key] = REQUIRED_VALUES[key]
    return cfg


@pytest.mark.parametrize("name", _configs("method"))
def test_method_config_instantiates(name):
    cfg = _with_required(["data=avdigits", "model=avdigits", f"method={name}"])
    check_run_options(cfg)
    model = instantiate(build_model_config(cfg, _FakeData(cfg.data)))
    method = instantiate(cfg.method, model=model)
    assert method.configure_optimizers() is not None


@pytest.mark.parametrize("optimizer", _configs("optimizer"))
@pytest.mark.parametrize("scheduler", _configs("scheduler"))
def test_optimizer_and_scheduler_configs_build_for_every_method(optimizer, scheduler):
    cfg = _compose(["data=synthetic", "model=mlp", f"optimizer={optimizer}", f"scheduler={scheduler}"])
    method = instantiate(cfg.method, model=instantiate(build_model_config(cfg, _FakeData(cfg.data))))
    configured = method.configure_optimizers()
    expected = cfg.method.optimizer._target_.rsplit(".", 1)[1]
    assert type(configured["optimizer"]).__name__ == expected
    assert configured["optimizer"].defaults["lr"] == cfg.method.optimizer.lr
    assert type(configured["lr_scheduler"]["scheduler"]).__name__ == cfg.method.scheduler._target_.rsplit(".", 1)[1]


@pytest.mark.parametrize("name", _configs("trainer"))
def test_trainer_config_instantiates(name, tmp_path):
    cfg = _compose([f"trainer={name}"], run_dir=tmp_path)
    if cfg.trainer.get("accelerator") == "gpu" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    trainer = instantiate(cfg.trainer, default_root_dir=str(tmp_path))
    assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("group", ["logger", "callbacks"])
def test_logger_and_callback_configs_instantiate(group, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in _configs(group):
        cfg = _compose([f"{group}={name}"], run_dir=tmp_path)
        objects = [instantiate(node) for node in cfg[group].values()]
        assert objects and all(obj is not None for obj in objects)


@pytest.mark.parametrize("name", _configs("diagnostics"))
def test_diagnostic_config_instantiates_under_its_name(name):
    from balance.diagnostics import Diagnostic

    cfg = _compose([f"diagnostics=[{name}]"])
    assert list(cfg.diagnostics) == [name], "a diagnostics file nests its options under its own name"
    check_run_options(cfg)
    diagnostic = instantiate(cfg.diagnostics[name])
    assert isinstance(diagnostic, Diagnostic) and diagnostic.name == name


def test_all_diagnostics_select_together():
    names = _configs("diagnostics")
    cfg = _compose([f"diagnostics=[{','.join(names)}]"])
    assert sorted(cfg.get("diagnostics") or {}) == sorted(names)


def _build_method(cfg):
    """The config's model and method, built with their weights on the meta device (no memory, no initialisation
    work: what is checked is that they build, not their values)."""
    with torch.device("meta"):
        model = instantiate(build_model_config(cfg, _FakeData(cfg.data)))
        return instantiate(cfg.method, model=model)


@pytest.mark.parametrize("name", _configs("experiment", nested=True))
def test_experiment_config_instantiates(name, tmp_path):
    """Composes, names its command in its first line, and builds its data (constructor), model and method."""
    text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
    header = text.split("\n\n")[0]
    assert re.search(rf"^# python train.py experiment={re.escape(name)}( |$)", header, re.M), \
        "an experiment starts with its command"
    cfg = _with_required([f"experiment={name}"], run_dir=tmp_path)
    check_run_options(cfg)
    assert _build_method(cfg).configure_optimizers() is not None
    assert OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("name", _configs("reproduce"))
def test_every_table_row_composes_and_builds_its_method(name, tmp_path):
    """A table's rows are overrides of train.py: each composes and builds its data, model and method."""
    from balance.reproduce import load_table

    for row in load_table(name)[1]:
        cfg = _compose(row.overrides, run_dir=tmp_path)
        check_run_options(cfg)
        assert _build_method(cfg).configure_optimizers() is not None, row.name


def test_every_recipe_is_used_by_an_experiment():
    texts = [p.read_text() for p in (CONF_DIR / "experiment").rglob("*.yaml")]
    unused = [name for name in _configs("recipe") if not any(f"/recipe/{name}\n" in t for t in texts)]
    assert not unused


@pytest.mark.parametrize("fusion", ["concat", "sum", "late_fusion"])
def test_fusion_method_aliases_set_the_fusion(fusion):
    cfg = _compose([f"method={fusion}"])
    assert cfg.method._target_ == "balance.methods.JointTraining"
    assert cfg.model.fusion == _compose([f"model/fusion={fusion}"]).model.fusion
