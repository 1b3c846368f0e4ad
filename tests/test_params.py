"""Parameters files: every shipped target validates; every kind of mistake is refused with a clear message."""

import copy

import pytest
import yaml

from weightscope.config.params import ParamsError, available_targets, check_overrides, check_quantile, load_target, parse_target

GOOD = yaml.safe_load((load_target("demo").path).read_text())


def test_shipped_targets_validate():
    names = available_targets()
    assert {"demo", "gemma-2-2b", "llama-3.1-8b", "gpt2-small"} <= set(names)
    for name in names:
        t = load_target(name)
        assert t.target == name
        if t.sae_id_template:
            assert t.sae_ids([3])[0] != t.sae_id_template  # the layer placeholder is filled


def test_gemma_ids_match_the_public_release():
    t = load_target("gemma-2-2b")
    assert t.sae_source == "gemma-scope-2b-pt-res-canonical"
    assert t.sae_ids([0, 25]) == ["layer_0/width_16k/canonical", "layer_25/width_16k/canonical"]


def _broken(**changes):
    raw = copy.deepcopy(GOOD)
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return raw


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"colour": "red"}, "unknown key(s) ['colour']"),
        ({"model.nmae": "x"}, "unknown key(s) ['nmae'] in model"),
        ({"dtype": "float64"}, "`dtype` is 'float64'"),
        ({"device": "tpu"}, "`device` is 'tpu'"),
        ({"layers": [0, -1]}, "non-negative"),
        ({"layers": "some"}, "`layers` must be `all`"),
        ({"layers": [1.5]}, "`layers` must be `all`"),
        ({"target": "a/b"}, "names a folder"),
        ({"model.processing": {"fold_ln": "yes"}}, "true/false"),
        ({"saes.id_template": "layer_{L}"}, "placeholder {layer}"),
        ({"chapters": {"01_x": 3}}, "chapters.01_x must be a mapping"),
    ],
)
def test_bad_values_are_refused(changes, fragment):
    with pytest.raises(ParamsError) as err:
        parse_target(_broken(**changes))
    assert fragment in str(err.value)


def test_missing_file_lists_known_targets():
    with pytest.raises(ParamsError, match="Known targets: .*demo"):
        load_target("no-such-target")


def test_layer_range_is_checked_against_the_model():
    t = parse_target(_broken(layers=[0, 7]))
    with pytest.raises(ParamsError, match=r"layer\(s\) \[7\] out of range; the model has 5 layers"):
        t.resolve_layers(5)
    assert parse_target(GOOD).resolve_layers(5) == [0, 1, 2, 3, 4]


def test_chapter_overrides_are_typed():
    defaults = {"k": 10, "quantile": 0.9, "use_null": True, "name": "x"}
    assert check_overrides(defaults, {"k": 20, "quantile": 1}, where="w") == {**defaults, "k": 20, "quantile": 1}
    with pytest.raises(ParamsError, match="unknown parameter"):
        check_overrides(defaults, {"kk": 1}, where="w")
    with pytest.raises(ParamsError, match="should be int"):
        check_overrides(defaults, {"k": "ten"}, where="w")
    with pytest.raises(ParamsError, match="should be bool"):
        check_overrides(defaults, {"use_null": 1}, where="w")
    with pytest.raises(ParamsError, match="between 0 and 1"):
        check_quantile(1.5, "quantile")


def test_relative_folders_are_read_from_the_params_file(tmp_path, monkeypatch):
    """"./x" in a params file means next to the file, wherever the book is run from (the pre-flight and the
    chapters run in different folders); hub ids and plain names are left as they are."""
    (tmp_path / "p").mkdir()
    raw = {"target": "rel", "model": {"name": "./model"}, "saes": {"source": "../saes"},
           "attn_saes": {"source": "./attn"}}
    path = tmp_path / "p" / "rel.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    target = load_target(str(path))
    assert target.model_name == str(tmp_path / "p" / "model")
    assert target.sae_source == str(tmp_path / "saes")
    assert target.attn_saes["source"] == str(tmp_path / "p" / "attn")
    hub = parse_target({**raw, "model": {"name": "google/gemma-2-2b"}, "saes": {"source": "demo"}}, path=path)
    assert hub.model_name == "google/gemma-2-2b" and hub.sae_source == "demo"
