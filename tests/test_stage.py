"""Stage spec: the paper's defaults, YAML + overrides, every bad field listed, config hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from chextrain.data.transforms import PhotoSim, StandardAugment
from chextrain.training.stage import (
    StageError,
    apply_overrides,
    config_hash,
    load_stage,
    parse_stage,
    resolved_config,
)
from chextrain.training.study import stage_deps


def test_defaults_are_the_papers() -> None:
    s = parse_stage({"name": "baseline"})
    assert (s.backbone, s.init, s.policy, s.freeze) == ("densenet121", "imagenet", "ones", "none")
    assert (s.optimizer.name, s.optimizer.lr) == ("adam", 1e-4)
    assert (s.batch_size, s.epochs, s.image_size) == (16, 3, 320)
    assert s.data.train == ["chexpert"] and s.heads == ["shared"] and s.train_heads == ["shared"]
    assert s.domain_heads == {"digital": "shared", "photo": "shared"}
    assert s.preprocessing.name == "imagenet" and s.title == "baseline"


def test_issue_example_yaml_loads(tmp_path: Path) -> None:
    path = tmp_path / "stage.yaml"
    path.write_text(
        "name: finetune\ninit: stage:baseline\ndata:\n  train: [chexphoto]\n  budget: null\npolicy: ones\n"
        "split: {by: patient, val_fraction: 0.1, seed: 0, frontal_only: false}\nheads: [shared]\n"
        "domain_heads: {digital: shared, photo: shared}\ntrain_heads: [shared]\nfreeze: last-block\n"
        "optimizer: {name: adam, lr: 1.0e-5}\nepochs: 3\nbatch_size: 16\nimage_size: 320\n"
        "augment: {photo_sim: {p: 0.5, recipe: phone}}\nprecision: auto\ndevices: auto\nnum_nodes: 1\n"
        "seed: 0\n"
    )
    s = load_stage(path)
    assert s.optimizer.lr == 1e-5 and s.freeze == "last-block" and stage_deps(s) == ["baseline"]
    assert s.augment.build() == [PhotoSim(p=0.5, recipe="phone", level=1)]


def test_overrides_are_yaml_parsed_and_nested(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("name: b\noptimizer: {lr: 1.0e-4}\n")
    s = load_stage(
        path,
        [
            "optimizer.lr=1e-5",
            "data.train=[chexpert, chexphoto]",
            "split.by=image",
            "devices=2",
            "augment=standard",
        ],
    )
    assert s.optimizer.lr == 1e-5 and s.data.train == ["chexpert", "chexphoto"] and s.split.by == "image"
    assert s.devices == 2 and s.augment.build() == [StandardAugment()]


@pytest.mark.parametrize("bad", ["optimizer.lr", "=3", "augment.photo_sim.p=0.5"])
def test_bad_override_is_named(bad: str) -> None:
    with pytest.raises(StageError, match="override"):
        apply_overrides({"augment": "standard"}, [bad])


def test_every_bad_field_is_listed_with_location_and_allowed_values() -> None:
    data = {
        "name": "x",
        "optimizer": {"name": "adamx", "lr": -1, "betas": 1},
        "freeze": "all",
        "optimiser": {},
        "epochs": 0,
        "precision": "8",
        "devices": "many",
        "backbone": "vgg",
        "augment": {"photo_sim": {"recipe": "tv"}},
        "data": {"train": ["mimic"]},
        "policy": "maybe",
    }
    with pytest.raises(StageError) as err:
        parse_stage(data, source="bad.yaml")
    text = str(err.value)
    assert text.startswith("bad.yaml: 12 invalid field(s)")
    for expected in [
        "optimizer.name: Input should be 'adam', 'sgd' or 'adamw' (got 'adamx')",
        "optimizer.lr: Input should be greater than 0 (got -1)",
        "optimizer.betas: unknown key; allowed keys: name, lr, weight_decay, momentum",
        "freeze: Input should be 'none', 'encoder' or 'last-block' (got 'all')",
        "optimiser: unknown key; allowed keys: name, label, objective, init",
        "epochs: Input should be greater than 0",
        "precision: '8' is not one of",
        "devices: 'many': expected 'auto'",
        "backbone: 'vgg' is not one of ['densenet121'",
        "augment.photo_sim.recipe: Input should be 'digital', 'photographic' or 'phone' (got 'tv')",
        "data.train.0: Input should be 'chexpert', 'chexphoto' or 'other' (got 'mimic')",
        "policy: policy 'maybe' is not one of ['ones', 'zeros', 'ignore']",
    ]:
        assert expected in text, expected


def test_cross_field_problems_are_listed_one_per_line() -> None:
    with pytest.raises(StageError) as err:
        parse_stage(
            {
                "name": "x",
                "heads": ["a", "b"],
                "domain_heads": {"digital": "a", "photo": "c"},
                "train_heads": ["a", "router"],
                "epochs": None,
            }
        )
    lines = str(err.value).splitlines()
    assert "  domain_heads.photo: 'c' is not one of heads ['a', 'b']" in lines
    assert "  train_heads: 'router' is not one of ['a', 'b']" in lines
    assert "  epochs / max_steps: give at least one" in lines


def test_missing_name_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="name: required key is missing"):
        parse_stage({})
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(StageError, match="expected a mapping"):
        load_stage(path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(StageError, match="not valid YAML"):
        load_stage(path)
    with pytest.raises(StageError, match="cannot read stage file"):
        load_stage(tmp_path / "absent.yaml")


def test_max_steps_alone_replaces_epochs() -> None:
    assert parse_stage({"name": "x", "max_steps": 5}).epochs is None
    both = parse_stage({"name": "x", "max_steps": 5, "epochs": 2})
    assert (both.epochs, both.max_steps) == (2, 5)


def test_augment_shorthands() -> None:
    assert parse_stage({"name": "x", "augment": "none"}).augment.build() == []
    both = parse_stage({"name": "x", "augment": ["photo_sim", "standard"]}).augment.build()
    assert [type(a) for a in both] == [PhotoSim, StandardAugment]  # photo first: it photographs the film
    with pytest.raises(StageError, match="augment"):
        parse_stage({"name": "x", "augment": "jitter"})


def test_resolved_config_round_trips_and_hash_is_stable() -> None:
    s = parse_stage({"name": "x", "optimizer": {"lr": 1e-5}, "augment": "standard"})
    again = parse_stage(resolved_config(s))
    assert again == s and config_hash(again) == config_hash(s)
    assert config_hash(s) != config_hash(parse_stage({**resolved_config(s), "seed": 1}))
    # Names for tables and worker counts do not change the result, so not the hash either.
    renamed = parse_stage({**resolved_config(s), "label": "Other", "num_workers": 3})
    assert config_hash(s) == config_hash(renamed)
    # An upstream stage's hash is part of this one's.
    assert config_hash(s, {"baseline": "a"}) != config_hash(s, {"baseline": "b"})


def test_stage_type_follows_the_objective_and_foreign_keys_are_refused_when_read() -> None:
    supervised, moco = parse_stage({"name": "s"}), parse_stage({"name": "m", "objective": "moco"})
    assert (type(supervised).__name__, type(moco).__name__) == ("SupervisedStage", "MocoStage")
    assert "moco" not in resolved_config(supervised) and "augment" not in resolved_config(moco)
    with pytest.raises(StageError) as err:
        parse_stage({"name": "s", "moco": {"queue_size": 8}}, source="s.yaml")
    assert "moco: does not apply to an `objective: supervised` stage (only to moco)" in str(err.value)
    for key, value in [
        ("augment", "standard"),
        ("freeze", "encoder"),
        ("evaluate", ["test"]),
        ("train_heads", ["shared"]),
    ]:
        with pytest.raises(StageError, match=f"{key}: does not apply to an `objective: moco` stage"):
            parse_stage({"name": "m", "objective": "moco", key: value})
    with pytest.raises(
        StageError, match=r"objective: expected one of \['supervised', 'moco', 'corners'\] \(got 'byol'\)"
    ):
        parse_stage({"name": "x", "objective": "byol"})


def test_old_preprocess_key_is_still_read_with_a_deprecation_message() -> None:
    with pytest.warns(FutureWarning, match="`preprocess` is deprecated: write `preprocessing`"):
        old = parse_stage({"name": "x", "preprocess": "histeq"})
    assert old == parse_stage({"name": "x", "preprocessing": "histeq"}) and old.preprocessing.name == "histeq"
    with pytest.raises(StageError, match="give only `preprocessing`"):
        parse_stage({"name": "x", "preprocess": "histeq", "preprocessing": "imagenet"})


def test_loggers_and_kept_checkpoints_are_keys_that_leave_the_hash_alone() -> None:
    base = parse_stage({"name": "s"})
    assert base.logger.names == ["tensorboard", "csv"] and base.keep_checkpoints == "last"
    chosen = parse_stage({"name": "s", "logger": ["mlflow", "csv"], "keep_checkpoints": "none"})
    assert chosen.logger.names == ["csv", "mlflow"] and chosen.logger.mlflow.tracking_uri is None
    assert config_hash(chosen) == config_hash(base)  # neither changes the weights or the outputs
    mapping = parse_stage({"name": "s", "logger": {"mlflow": {"experiment": "e"}, "tensorboard": True}})
    assert mapping.logger.names == ["tensorboard", "mlflow"] and mapping.logger.mlflow.experiment == "e"
    assert parse_stage({"name": "s", "logger": "none"}).logger.names == []
    assert parse_stage({"name": "m", "objective": "moco", "logger": "wandb"}).logger.wandb.offline is True
    with pytest.raises(StageError, match=r"logger: \['comet'\]: expected names from"):
        parse_stage({"name": "s", "logger": ["comet"]})
    with pytest.raises(StageError, match="keep_checkpoints: Input should be 'last', 'best', 'all' or 'none'"):
        parse_stage({"name": "s", "keep_checkpoints": "first"})


def test_a_bad_override_is_named_not_the_file(tmp_path: Path) -> None:
    from chextrain.training.stage import check_overrides

    path = tmp_path / "stage.yaml"
    path.write_text("name: s\nfreeze: none\n")
    with pytest.raises(StageError) as err:
        load_stage(path, ["optimiser.lr=1"])
    assert str(err.value).startswith("--set optimiser.lr=1: 1 invalid field(s):") and str(path) not in str(
        err.value
    )
    with pytest.raises(StageError) as err:  # two bad overrides: both named, in the order of the fields
        load_stage(path, ["freeze=all", "batch_size=0"])
    assert str(err.value).startswith("--set batch_size=0, --set freeze=all: 2 invalid field(s)")
    path.write_text("name: s\nfreeze: half\n")
    with pytest.raises(StageError) as err:
        load_stage(path, ["batch_size=0"])
    assert str(err.value).startswith(f"{path}: 2 invalid field(s)") and "(from --set batch_size=0)" in str(
        err.value
    )
    # alone: valid for some stage type, or refused naming the override (a study checks them once)
    check_overrides(["optimizer.lr=1e-5", "moco.queue_size=16", "logger=[csv]"])
    for bad, says in (
        ("epoch=1", "epoch: unknown key"),
        ("moco.queue_size=-1", "moco.queue_size"),
        ("objective=x", "objective"),
    ):
        with pytest.raises(StageError, match=f"^--set {bad}") as err:
            check_overrides([bad])
        assert says in str(err.value)


def test_yaml_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "stage.yaml"
    path.write_text("name: s\nepochs: [1,\n")
    with pytest.raises(StageError, match=r"stage\.yaml, line 3, column 1: not valid YAML \(") as err:
        load_stage(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["baseline", "finetune", "heads", "moco", "corners"])
def test_the_example_stages_load(name: str) -> None:
    path = Path(__file__).resolve().parents[1] / "configs" / "stages" / f"{name}.yaml"
    stage = load_stage(path)
    assert stage.name and path.read_text().startswith("#")  # commented
    assert stage.objective == (name if name in ("moco", "corners") else "supervised")
