"""The one `Config` base: reading mappings, the validators' messages, and the errors a user
meets first when loading a run config (YAML typos, lengths, corpora, the CLI)."""

import dataclasses
from pathlib import Path
from typing import ClassVar

import pytest

from llm_jax.cli import main
from llm_jax.config import Config, at_least, in_interval, nearest_first, one_of
from llm_jax.models.config import ModelConfig
from llm_jax.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Toy(Config):
    section: ClassVar[str] = "toy"

    steps: int = 1
    rate: float = 0.5
    kind: str = "a"
    flag: bool = False
    sizes: tuple[int, ...] = ()
    names: tuple[str, ...] | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        at_least(self, "steps", 1)
        in_interval(self, "rate", 0, 1, high_open=True)
        one_of(self, "kind", ("a", "b"))


def test_from_dict_coerces_to_the_field_types_and_round_trips():
    cfg = Toy.from_dict(
        {"steps": 1e3, "rate": 0, "flag": 1, "sizes": [2.0, 3], "names": "x", "limit": None}
    )
    assert cfg == Toy(steps=1000, rate=0.0, flag=True, sizes=(2, 3), names=("x",))
    assert isinstance(cfg.steps, int) and isinstance(cfg.rate, float)
    assert cfg.to_dict()["sizes"] == [2, 3] and Toy.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(kind="b").kind == "b" and Toy.field_names()[0] == "steps"


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ({"stpes": 2}, r"unknown Toy keys \['stpes'\] in section 'toy'; valid keys are \['steps',"),
        ({"steps": 2.5}, r"toy.steps=2.5 must be a whole number \(int\)"),
        ({"steps": "2"}, r"toy.steps='2' must be a number"),
        ({"steps": True}, r"toy.steps=True must be a number"),
        ({"steps": None}, r"toy.steps must be given a value"),
        ({"sizes": [1, 0.5]}, r"toy.sizes\[1\]=0.5 must be a whole number"),
        ({"flag": "yes"}, r"toy.flag='yes' must be true or false"),
        ({"kind": 3}, r"toy.kind=3 must be a string"),
        ({"steps": 0}, r"toy.steps=0 must be an integer >= 1\."),
        ({"rate": 1.0}, r"toy.rate=1.0 must be in \[0, 1\)\."),
        ({"kind": "c"}, r"toy.kind='c' is not one of \['a', 'b'\]\."),
    ],
)
def test_from_dict_and_validators_name_the_section_key(d, message):
    with pytest.raises(ValueError, match=message):
        Toy.from_dict(d)


def test_nearest_first():
    assert nearest_first(["lables"], ["steps", "labels", "label_names"])[0] == "labels"
    assert nearest_first(["zzz"], ["b", "a"]) == ["b", "a"]


def test_preset_with_an_unknown_field_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown ModelConfig keys \['n_heads'\].*\['num_heads'"):
        ModelConfig.preset("gpt2-tiny", n_heads=4)
    assert ModelConfig.preset("gpt2-tiny", num_heads=2).num_heads == 2


def test_yaml_typo_names_the_file_or_override_line_and_column(tmp_path):
    with pytest.raises(ValueError, match=r"override 'data.paths=\[a,', line 1, column 15: malf"):
        load_config(TINY, ["data.paths=[a,"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: gpt2-tiny\ndata:\n  seq_len: [1,\n")
    with pytest.raises(ValueError, match=rf"{bad}, line 5, column 1: malformed YAML") as e:
        load_config(bad)
    assert "\n" not in str(e.value) and "<unicode string>" not in str(e.value)


def test_seq_len_longer_than_the_position_table_fails_at_load():
    message = r"data.seq_len=512 .* model.max_position_embeddings=128"
    with pytest.raises(ValueError, match=message):
        load_config(TINY, ["data.seq_len=512"])
    # RoPE has no table: any length loads.
    assert load_config(TINY, ["data.seq_len=512", "model.position=rope"]).data.seq_len == 512


def test_missing_corpus_fails_at_load_saying_to_set_data_paths():
    with pytest.raises(ValueError, match=r"data.paths: nope.txt not found.*set data.paths=\["):
        load_config(TINY, ["data.paths=[nope.txt]"])


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "usage: llm-jax train CONFIG [section.key=value ...]" in err
    assert "error: a CONFIG is required" in err
    assert main(["train", str(TINY), f"workdir={tmp_path}", "data.paths=[a,"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "column 15" in err and "Traceback" not in err
