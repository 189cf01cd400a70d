import dataclasses

import pytest

from lepton_jax import config


@dataclasses.dataclass(frozen=True)
class Inner:
    width: int = 64
    rate: float = 0.1


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "cnn"
    resume: bool = False
    sizes: tuple = (1, 2)
    model: Inner = Inner()


def test_overrides_by_name_nested_and_typed():
    c = config.override(Outer(), ["--name", "mlp", "--resume", "--model.width=256", "--model.rate", "0.5",
                                  "--sizes=3,4,5"])
    assert c == Outer(name="mlp", resume=True, sizes=(3, 4, 5), model=Inner(width=256, rate=0.5))
    assert config.override(Outer(), ["--resume=false"]).resume is False
    assert config.to_dict(c)["model"] == {"width": 256, "rate": 0.5}


def test_bad_overrides_raise():
    with pytest.raises(ValueError, match=r"unknown config field 'model.depth'; known fields: \['width', 'rate'\]"):
        config.override(Outer(), ["--model.depth=3"])
    with pytest.raises(ValueError, match="--model.width expects a int, got 'wide'"):
        config.override(Outer(), ["--model.width=wide"])
    with pytest.raises(ValueError, match="expected --name"):
        config.override(Outer(), ["width=3"])
    with pytest.raises(ValueError, match="--name needs a value"):
        config.override(Outer(), ["--name"])


def test_dashes_in_override_names_read_as_underscores():
    import dataclasses

    from lepton_jax import config as config_lib

    @dataclasses.dataclass(frozen=True)
    class Run:
        batch_size: int = 1
        base_dtype: str = "float32"

    assert config_lib.override(Run(), ["--batch-size", "8", "--base-dtype=int8"]) == Run(batch_size=8, base_dtype="int8")


def test_print_help_lists_fields_with_defaults(capsys):
    from recipes import digits, finetune, gpt

    assert not config.print_help(["--lr=0.1"], "doc", Inner())
    assert gpt.main(["--help"]) is None and finetune.main(["-h"]) == 0 and digits.main(["--help"]) == {}
    printed = capsys.readouterr().out
    assert "--mesh='data=-1'" in printed and "--microbatches=1" in printed and "Fields:" in printed
