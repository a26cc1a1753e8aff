from pathlib import Path

import pytest

from textune.config import Config, config_help, load_config, parse_override_args, parse_yaml
from textune.errors import ConfigError, TextuneError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.output_dir.startswith("runs/")


def test_shipped_configs_include_the_three_the_readme_names():
    names = {p.name for p in CONFIGS}
    assert {"sst2-minilm-full.yaml", "mrpc-minilm-full.yaml", "sst2-minilm-head.yaml"} <= names


ACCELERATE_CONFIGS = sorted((CONFIGS[0].parent / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_launcher_config_loads_in_accelerate(path):
    # Launcher configs (configs/accelerate/) are Accelerate's format, read by `accelerate launch --config_file`.
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(path)).compute_environment.value == "LOCAL_MACHINE"


def test_accelerate_configs_cover_cpu_one_gpu_ddp_fsdp_and_zero2():
    assert {p.name for p in ACCELERATE_CONFIGS} == {"cpu-gloo.yaml", "one-gpu.yaml", "multi-gpu-ddp.yaml", "fsdp.yaml",
                                                    "deepspeed-zero2.yaml"}


def test_yaml_reads_exponent_floats_without_a_dot():
    assert parse_yaml("lr: 3e-5\nn: 3\ns: '3e-5'") == {"lr": 3e-5, "n": 3, "s": "3e-5"}


def test_overrides_are_typed_and_applied(tmp_path):
    overrides = parse_override_args(["--train.lr", "3e-5", "--train.epochs=2", "--data.train", "x.csv",
                                     "--data.label_names", "[neg, pos]"])
    cfg = load_config(None, overrides)
    assert cfg.train.lr == 3e-5 and cfg.train.epochs == 2.0 and cfg.data.train == "x.csv"
    assert cfg.data.label_names == ["neg", "pos"]


def test_unknown_key_names_close_matches():
    with pytest.raises(ConfigError, match=r"train\.learning_rat: unknown key; did you mean"):
        load_config(None, {"data.train": "x.csv", "train.learning_rat": 1e-4})
    with pytest.raises(ConfigError, match=r"train\.bach_size: unknown key; did you mean train\.batch_size"):
        load_config(None, {"data.train": "x.csv", "train.bach_size": 8})


def test_wrong_type_names_key_expected_and_got():
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number, got 'fast' \(str\)"):
        load_config(None, {"data.train": "x.csv", "train.lr": "fast"})
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number, got '3e-5'"):
        load_config(None, {"data.train": "x.csv", "train.lr": "3e-5"})  # quoted in YAML: a string


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"tuning\.method: expected one of full, head"):
        load_config(None, {"data.train": "x.csv", "tuning.method": "partial"})


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(None, {"data.train": "x.csv", "train.batch_size": 0, "train.lr": -1.0, "train.epochz": 1})
    problems = err.value.problems
    assert len(problems) == 1  # unknown keys and type errors first; value checks run once those are fixed
    with pytest.raises(ConfigError) as err:
        load_config(None, {"data.train": "x.csv", "train.batch_size": 0, "train.lr": -1.0})
    assert any("train.batch_size: must be greater than 0" in p for p in err.value.problems)
    assert any("train.lr: must be greater than 0" in p for p in err.value.problems)


def test_missing_training_data_is_reported():
    with pytest.raises(ConfigError, match="data.train: no training data"):
        load_config(None, {})


def test_unknown_metric_suggests():
    with pytest.raises(ConfigError, match=r"did you mean accuracy"):
        load_config(None, {"data.train": "x.csv", "train.metric": "acuracy"})


def test_config_file_errors(tmp_path):
    with pytest.raises(TextuneError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(TextuneError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(TextuneError, match="must hold a mapping"):
        load_config(listy)


def test_override_without_value_is_an_error():
    with pytest.raises(TextuneError, match="has no value"):
        parse_override_args(["--train.lr"])
    with pytest.raises(TextuneError, match="unexpected argument"):
        parse_override_args(["lr=3"])


def test_help_lists_every_key_with_help():
    text = config_help()
    for key in ("model.name", "data.text_pair_column", "train.early_stopping_patience", "tuning.method"):
        assert key in text
    keys = [line for line in text.splitlines() if line.startswith("  ")]
    assert len(keys) > 100 and all(line.split("): ", 1)[1].strip() for line in keys)


def test_help_config_is_grouped_by_section_and_lists_every_fixed_choice():
    import dataclasses
    import typing

    lines = config_help().splitlines()
    headings = [line.split(":")[0] for line in lines if line and not line.startswith(" ") and ": " in line][1:]
    assert headings == ["top level", "model", "data", "data.augment", "tuning", "pretrain", "train", "search", "eval",
                        "logging"]
    # every key sits under its own section's heading
    section = None
    for line in lines[1:]:
        if line and not line.startswith(" "):
            section = line.split(":")[0]
        elif line.startswith("  ") and section != "top level":
            assert line.split()[0].rsplit(".", 1)[0] == section, line
    scheduler = next(line for line in lines if line.startswith("  train.scheduler "))
    assert "(default: 'linear'; choices: linear, cosine, constant)" in scheduler
    assert "(default: empty; choices: maximize, minimize, empty)" in next(l for l in lines if "search.direction " in l)
    assert "choices: auto, true, false" in next(l for l in lines if "train.compile " in l)
    # every Literal in the typed config shows all of its values
    # (by the whole dotted key: a name may be in two sections, tuning.method and train.method)
    hints = typing.get_type_hints(Config)
    sections = {Config: "", **{hints[f.name]: f"{f.name}." for f in dataclasses.fields(Config)
                               if dataclasses.is_dataclass(hints[f.name])}}
    for cls, prefix in sections.items():
        for name, tp in typing.get_type_hints(cls).items():
            literals = [a for a in (typing.get_args(tp) or (tp,)) if typing.get_origin(a) is typing.Literal] or (
                [tp] if typing.get_origin(tp) is typing.Literal else [])
            for literal in literals:
                line = next(l for l in lines if l.startswith("  ") and l.split()[0] == prefix + name)
                assert all(str(v) in line.split("choices: ")[1] for v in typing.get_args(literal)), line


def test_config_yaml_keeps_data_paths_resolved_and_as_given(tmp_path, monkeypatch):
    from textune.config import save_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    cfg = load_config(None, {"data.train": "data/train.csv", "data.validation": "data/val.csv",
                             "model.name": "sentence-transformers/all-MiniLM-L6-v2"})
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert text.splitlines()[0] == (f"# paths resolved against {tmp_path}, where training ran; as given: "
                                    f"data.train: data/train.csv, data.validation: data/val.csv")
    monkeypatch.chdir("/")
    saved = load_config(tmp_path / "config.yaml")  # still a config textune reads, from any directory
    assert saved.data.train == str(tmp_path / "data" / "train.csv")
    assert saved.data.validation == str(tmp_path / "data" / "val.csv")
    assert saved.model.name == "sentence-transformers/all-MiniLM-L6-v2"  # a Hub id, not a local path: as given


def test_hub_dataset_keys_have_defaults_and_help():
    cfg = load_config(None, {"data.name": "glue", "data.config": "mrpc", "data.split_test": "test_matched"})
    assert (cfg.data.config, cfg.data.revision, cfg.data.split_train, cfg.data.split_validation,
            cfg.data.split_test) == ("mrpc", None, "train", "validation", "test_matched")
    text = config_help()
    for key in ("data.config", "data.revision", "data.split_train", "data.split_validation", "data.split_test"):
        assert f"  {key} (default" in text
    with pytest.raises(ConfigError, match=r"data.config: names a configuration of a Hub dataset, but data.name is empty"):
        load_config(None, {"data.train": "x.csv", "data.config": "mrpc"})
