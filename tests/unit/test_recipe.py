import pytest
from conftest import ROOT

from patcher.recipe import Recipe, RecipeError, flag_fields, load_recipe, parse_recipe, preset_names, with_overrides


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    r = Recipe()
    assert r.mla.kv_keep == 0.6 and not r.mla.enabled
    p = tmp_path / "r.yaml"
    p.write_text(r.to_yaml())
    assert load_recipe(p) == r


@pytest.mark.parametrize("data, needle", [
    ({"mla": {"kv_kep": 0.5}}, "mla.kv_kep: 未知的键"),
    ({"mla": {"kv_keep": "lots"}}, "mla.kv_keep"),
    ({"mla": {"kv_keep": 1.5}}, "mla.kv_keep"),
    ({"mla": {"kv_lora_rank": 0}}, "mla.kv_lora_rank"),
    ({"mla": {"init": "magic"}}, "mla.init"),
    ({"bogus": {}}, "bogus: 未知的键"),
])
def test_bad_recipes_get_clear_errors(data, needle):
    with pytest.raises(RecipeError, match=needle.replace(".", r"\.")):
        parse_recipe(data)


def test_presets_load_by_name():
    names = preset_names()
    assert "mla-kv40" in names and names == sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    for n in names:
        assert load_recipe(n).name == n
    assert load_recipe("mla-kv40").mla.enabled


def test_unknown_preset_lists_available():
    with pytest.raises(RecipeError, match="mla-kv40"):
        load_recipe("no-such-preset")


def test_every_option_has_one_flag_and_overrides_validate():
    flags = [f.json_schema_extra["flag"] for _, _, f in flag_fields()]
    assert len(flags) == len(set(flags))
    for needed in ("--mla", "--kv-keep", "--kv-lora-rank", "--calib-data", "--calib-tokens", "--seed",
                   "--eval-data", "--overwrite"):
        assert any(f.split("/")[0] == needed for f in flags), needed
    # a switch that is on by default must have a way off on the command line
    on = [f.json_schema_extra["flag"] for _, _, f in flag_fields() if f.annotation is bool and f.default]
    assert on and all("/--no-" in f for f in on), on
    r = with_overrides(load_recipe("mla-kv40"), {("mla", "kv_keep"): 0.5})
    assert r.mla.kv_keep == 0.5 and r.mla.enabled
    with pytest.raises(RecipeError):
        with_overrides(r, {("mla", "kv_keep"): -1})
