"""Training presets: the built-ins load and validate, every field type parses, bad files and overrides give errors
that name the place and the fix, overrides take precedence, and the fields are checked together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowgrpo_core import presets
from flowgrpo_core.presets import FIELDS, Preset, PresetError, load_preset_file, parse_overrides, resolve

BUILTINS = presets.builtin_presets()

# The README demo depends on exactly these values (the reward must rise within 20 iterations).
TINY_DEMO = dict(prompts_per_iteration=2, group_size=4, width=128, height=128, steps=8, sde_kind="flow_sde",
                 noise_level=0.7, cfg=4.5, negative_prompt="", step_mode="fraction", train_fraction=0.99,
                 reward="redness", clip_range=0.2, kl_beta=0.0, rank=8, alpha=8.0, targets="attention_mlp",
                 learning_rate=1e-2, iterations=20, save_every=10, eval_steps=0, ema_decay=0.0)


def write(tmp_path: Path, text: str, name: str = "mine.json") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def preset_text(values: dict, **top) -> str:
    return json.dumps({"family": "sd3", **top, "values": values}, indent=2)


# ------------------------------------------------------------------------------------------------ built-ins
def test_builtins_are_the_files_of_the_preset_folder():
    files = sorted(p.stem for p in presets.PRESET_DIR.glob("*.json"))
    assert list(BUILTINS) == files
    assert {"sd35_medium_flowgrpo", "sd35_medium_fast", "flux_dev_flowgrpo", "flux_dev_fast", "flux_dev_mixgrpo",
            "qwen_image_flowgrpo", "tiny_demo", "flux2_flowgrpo", "z_image_flowgrpo", "qwen_image_edit_flowgrpo",
            "wan22_t2v_flowgrpo"} <= set(BUILTINS)


@pytest.mark.parametrize("name", list(BUILTINS))
def test_every_builtin_loads_validates_and_cites_its_source(name):
    preset = BUILTINS[name]
    assert preset.name == name and presets.FAMILY_PATTERN.fullmatch(preset.family)
    assert preset.title and preset.description and preset.source
    assert preset.values and set(preset.values) <= set(FIELDS)
    assert presets.validate_values(preset.values) == dict(preset.values)
    assert resolve(preset, "") == dict(preset.values)
    # the file round-trips through the loader unchanged
    assert load_preset_file(presets.PRESET_DIR / f"{name}.json") == preset
    for field, value in preset.values.items():
        assert type(value) is FIELDS[field].kind, (field, value)


def test_tiny_demo_has_the_values_the_readme_demo_needs():
    assert dict(BUILTINS["tiny_demo"].values) == TINY_DEMO
    assert BUILTINS["tiny_demo"].family == "sd3"


def test_the_docs_list_every_builtin_and_field():
    docs = (Path(__file__).resolve().parents[2] / "docs" / "presets.md").read_text()
    missing = [name for name in [*BUILTINS, *FIELDS] if f"`{name}`" not in docs]
    assert not missing


def test_builtin_values_are_read_only_and_cached_copies_are_independent():
    preset = BUILTINS["sd35_medium_flowgrpo"]
    with pytest.raises(TypeError):
        preset.values["steps"] = 3
    mine = presets.builtin_presets()
    mine.pop("tiny_demo")
    assert "tiny_demo" in presets.builtin_presets()


# ------------------------------------------------------------------------------------------------ field parsing
def _inside(field) -> list:
    """Values inside a numeric field's range: both ends and a middle one."""
    values = [field.low, field.high, (field.low + field.high) / 2]
    return [int(v) for v in values] if field.kind is int else values


@pytest.mark.parametrize("name", [n for n, f in FIELDS.items() if f.kind in (int, float)])
def test_numeric_fields_parse_within_their_range_and_reject_outside(name):
    field = FIELDS[name]
    for value in _inside(field):
        text = str(value) if field.kind is int else repr(float(value))
        parsed = parse_overrides(f"{name} = {text}")[name]
        assert type(parsed) is field.kind and parsed == value
    for outside in (field.low - 1, field.high * 2 + 1):
        outside = int(outside) if field.kind is int else float(outside)
        with pytest.raises(PresetError, match=rf"{name} = .* out of range"):
            parse_overrides(f"{name} = {outside}")
    with pytest.raises(PresetError, match=rf"overrides line 1: {name} = abc is not"):
        parse_overrides(f"{name} = abc")


def test_number_syntax():
    assert parse_overrides("learning_rate = 1e-4")["learning_rate"] == pytest.approx(1e-4)
    assert parse_overrides("learning_rate = 3E-4")["learning_rate"] == pytest.approx(3e-4)
    assert parse_overrides("alpha = 16")["alpha"] == 16.0 and type(parse_overrides("alpha = 16")["alpha"]) is float
    assert parse_overrides("iterations = 1e4")["iterations"] == 10_000  # an exact integer in float notation
    assert parse_overrides("steps = +12")["steps"] == 12
    for bad in ("steps = 2.5", "steps = 1e-1", "learning_rate = nan", "learning_rate = inf", "steps = 0x10"):
        with pytest.raises(PresetError):
            parse_overrides(bad)


@pytest.mark.parametrize("name", [n for n, f in FIELDS.items() if f.kind is bool])
def test_bool_fields_parse_every_spelling(name):
    for text, value in (("true", True), ("False", False), ("yes", True), ("NO", False), ("1", True), ("0", False),
                        ("on", True), ("off", False)):
        assert parse_overrides(f"{name} = {text}")[name] is value
    with pytest.raises(PresetError, match="is not true or false"):
        parse_overrides(f"{name} = maybe")


@pytest.mark.parametrize("name", [n for n, f in FIELDS.items() if f.choices])
def test_choice_fields_take_each_choice_bare_or_quoted_and_hint_a_typo(name):
    field = FIELDS[name]
    for choice in field.choices:
        assert parse_overrides(f"{name} = {choice}")[name] == choice
        assert parse_overrides(f"{name} = \"{choice}\"")[name] == choice
    typo = field.choices[-1][:-1] + "x"
    with pytest.raises(PresetError, match=rf"is not one of .*did you mean '{field.choices[-1]}'"):
        parse_overrides(f"{name} = {typo}")


def test_string_values_bare_quoted_and_escaped():
    parse = lambda text: parse_overrides(text)["negative_prompt"]  # noqa: E731
    assert parse("negative_prompt = blurry") == "blurry"
    assert parse('negative_prompt = " "') == " "
    assert parse("negative_prompt = ''") == ""
    assert parse("negative_prompt =") == ""
    assert parse('negative_prompt = "blurry, lowres # not a comment"  # a comment') == "blurry, lowres # not a comment"
    assert parse("negative_prompt = 'it''s'") == "it''s"  # single quotes are literal
    assert parse(r'negative_prompt = "say \"no\"\n"') == 'say "no"\n'
    # nothing is evaluated: an expression is just text (a string field) or a type error (a number field)
    assert parse("negative_prompt = __import__('os').getcwd()") == "__import__('os').getcwd()"
    with pytest.raises(PresetError, match="steps = __import__"):
        parse_overrides("steps = __import__('os').cpu_count()")


def test_override_layout_lines_commas_comments_blank_lines():
    text = "\n# the batch\ngroup_size = 8, prompts_per_iteration = 3  # small\n\n  learning_rate=1e-4 ,\ncfg = 1\n"
    assert parse_overrides(text) == dict(group_size=8, prompts_per_iteration=3, learning_rate=1e-4, cfg=1.0)
    assert parse_overrides("") == {} and parse_overrides("  # only a comment\n") == {}


# ------------------------------------------------------------------------------------------------ override errors
def test_override_errors_name_the_line():
    cases = {
        "steps = 10\ngroup_size = 8\nlerning_rate = 1e-3": (3, "unknown field 'lerning_rate' (did you mean "
                                                              "'learning_rate'?)"),
        "steps = 10\nsteps 12": (2, "'steps 12' is not of the form field = value"),
        "steps = 10, group_size = 4\ngroup_size = 8": (2, "group_size is set twice (lines 1 and 2)"),
        "cfg = 2\nnegative_prompt = \"open": (2, "unclosed \" quote"),
        "= 3": (1, "is not of the form field = value"),
    }
    for text, (line, message) in cases.items():
        with pytest.raises(PresetError) as info:
            parse_overrides(text)
        assert info.value.problem.startswith(f"overrides line {line}: "), (text, str(info.value))
        assert message in info.value.problem, (text, str(info.value))
        assert info.value.fix


def test_unknown_field_lists_the_valid_fields():
    with pytest.raises(PresetError) as info:
        parse_overrides("no_such_knob_at_all = 1")
    assert "did you mean" not in info.value.problem
    assert all(name in info.value.fix for name in FIELDS)


# ------------------------------------------------------------------------------------------------ files
def test_bad_json_reports_file_line_and_column(tmp_path):
    text = '{\n  "family": "sd3",\n  "values": {"steps": 10,}\n}\n'
    path = write(tmp_path, text)
    bad_line = text.splitlines()[2]
    column = bad_line.index(",}") + 2  # the "}" after the trailing comma, 1-based
    with pytest.raises(PresetError) as info:
        load_preset_file(path)
    assert info.value.problem.startswith(f"{path}:3:{column}: invalid JSON")


def test_unknown_field_in_a_file_points_at_the_key_and_suggests_the_field(tmp_path):
    text = preset_text({"steps": 10, "lerning_rate": 1e-3})
    path = write(tmp_path, text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if '"lerning_rate"' in l)
    column = text.splitlines()[line - 1].index('"lerning_rate"') + 1
    with pytest.raises(PresetError) as info:
        load_preset_file(path)
    assert info.value.problem.startswith(f"{path}:{line}:{column}: unknown field 'lerning_rate'")
    assert "did you mean 'learning_rate'?" in info.value.problem
    assert all(name in info.value.fix for name in FIELDS)


@pytest.mark.parametrize("field, value, message", [
    ("steps", 5000, "steps = 5000 is out of range: steps takes an integer in [2, 1000]"),
    ("learning_rate", 2.0, "learning_rate = 2 is out of range: learning_rate takes a number in [1e-08, 1]"),
    ("ema_decay", 0.99999, "ema_decay = 0.99999 is out of range: ema_decay takes a number in [0, 0.9999]"),
    ("steps", 10.0, "steps = 10.0 has the wrong type: steps takes an integer in [2, 1000]"),
    ("norm_rescale", 1, "norm_rescale = 1 has the wrong type: norm_rescale takes true or false"),
    ("cfg", "4.5", "cfg = '4.5' has the wrong type: cfg takes a number in [1, 30]"),
    ("cfg", True, "cfg = True has the wrong type"),
    ("sde_kind", "ode", "sde_kind = 'ode' is not one of flow_sde, dance_sde, cps, euler_ancestral"),
])
def test_wrong_type_or_range_in_a_file_names_field_value_and_range(tmp_path, field, value, message):
    path = write(tmp_path, preset_text({field: value}))
    with pytest.raises(PresetError) as info:
        load_preset_file(path)
    assert info.value.problem.startswith(f"{path}:"), str(info.value)
    assert message in info.value.problem, str(info.value)


def test_file_structure_errors(tmp_path):
    cases = [
        ('[1, 2]', "a preset file holds one JSON object"),
        ('{"values": {}}', "the file has no 'family'"),
        ('{"family": "SD-XL", "values": {}}', "family 'SD-XL' is not a model family name"),
        ('{"family": "sd3"}', '"values" must be an object'),
        ('{"family": "sd3", "values": [1]}', '"values" must be an object'),
        ('{"family": "sd3", "valus": {}, "values": {}}', "unknown top-level key 'valus' (did you mean 'values'?)"),
        ('{"family": "sd3", "title": 3, "values": {}}', "title must be a string"),
        ('{"family": "sd3", "values": {"steps": 10, "steps": 12}}', "the key 'steps' appears twice"),
    ]
    for text, message in cases:
        path = write(tmp_path, text)
        with pytest.raises(PresetError) as info:
            load_preset_file(path)
        assert info.value.problem.startswith(f"{path}:") and message in info.value.problem, (text, str(info.value))
    text = '{"family": "sd3",\n "values": {"steps": 10,\n  "steps": 12}}'
    with pytest.raises(PresetError) as info:
        load_preset_file(write(tmp_path, text))
    assert info.value.problem.startswith(f"{tmp_path / 'mine.json'}:3:3: the key 'steps' appears twice")
    with pytest.raises(PresetError, match="cannot read"):
        load_preset_file(tmp_path / "missing.json")


def test_a_minimal_file_loads_with_defaults_and_a_given_name(tmp_path):
    path = write(tmp_path, "\ufeff" + preset_text({"steps": 12, "learning_rate": 1e-4}), name="small.json")
    preset = load_preset_file(path)
    assert (preset.name, preset.title, preset.description, preset.source) == ("small", "small", "", "")
    assert dict(preset.values) == {"steps": 12, "learning_rate": 1e-4}
    assert load_preset_file(path, name="user/small").name == "user/small"


# ------------------------------------------------------------------------------------------------ resolve
def test_resolve_overrides_win_and_the_rest_is_kept():
    preset = BUILTINS["sd35_medium_flowgrpo"]
    before = dict(preset.values)
    resolved = resolve(preset, "group_size = 8\nprompts_per_iteration = 4, reward = brightness")
    assert resolved["group_size"] == 8 and resolved["prompts_per_iteration"] == 4
    assert resolved["reward"] == "brightness"  # a field the preset does not set
    assert {k: v for k, v in resolved.items() if k not in ("group_size", "prompts_per_iteration", "reward")} == {
        k: v for k, v in before.items() if k not in ("group_size", "prompts_per_iteration")}
    assert dict(preset.values) == before  # the preset is unchanged


def test_resolve_checks_the_overridden_values_together():
    preset = BUILTINS["sd35_medium_flowgrpo"]  # flow_sde 0.7, 10 steps, 2 optimizer steps, micro-batches of 9
    with pytest.raises(PresetError) as info:
        resolve(preset, "sde_kind = cps\nnoise_level = 1.2")
    assert "noise_level 1.2 does not suit sde_kind cps" in info.value.problem
    assert "preset sd35_medium_flowgrpo with the overrides sde_kind, noise_level" in info.value.problem
    assert resolve(preset, "sde_kind = cps, noise_level = 0.8")["sde_kind"] == "cps"
    with pytest.raises(PresetError, match="optimizer_steps 2 needs at least as many micro-batches.*make 1"):
        resolve(preset, "group_size = 4, prompts_per_iteration = 2")
    assert resolve(preset, "group_size = 4, prompts_per_iteration = 2, optimizer_steps = 1")["optimizer_steps"] == 1


@pytest.mark.parametrize("values, ok", [
    (dict(steps=10, step_mode="fixed_window", window_size=3, window_start=6), True),  # steps 6-8, 9 is the ODE step
    (dict(steps=10, step_mode="fixed_window", window_size=3, window_start=7), False),
    (dict(steps=6, step_mode="random_window", window_size=3, window_start=0, window_end=3), True),
    (dict(steps=6, step_mode="random_window", window_size=3, window_start=0, window_end=6), False),  # past N - 1
    (dict(steps=6, step_mode="random_window", window_size=3, window_start=1, window_end=3), False),  # 2 < 3 steps
    (dict(steps=6, step_mode="random_window", window_size=5, window_start=0, window_end=0), True),  # 0 = N - 1
    (dict(steps=6, step_mode="random_window", window_size=6, window_start=0, window_end=0), False),
    (dict(steps=25, step_mode="sliding_window", window_size=4, window_start=24, window_shift_every=5), False),
    (dict(steps=2, step_mode="fraction", train_fraction=0.2), False),  # floor(2 * 0.2) = 0 steps
    (dict(steps=20, step_mode="random_subset", train_fraction=0.6), True),
    (dict(sde_kind="euler_ancestral", noise_level=1.5), False),
    (dict(sde_kind="dance_sde", noise_level=1.5), True),
    (dict(optimizer_steps=3, micro_batch_size=3, prompts_per_iteration=2, group_size=4), True),  # 3 micro-batches
    (dict(optimizer_steps=4, micro_batch_size=3, prompts_per_iteration=2, group_size=4), False),
    (dict(optimizer_steps=2, micro_batch_size=0, prompts_per_iteration=2, group_size=4), False),  # 0: one batch
    (dict(eval_steps=0, eval_every=10), False),
    (dict(eval_steps=40, eval_every=10), True),
    (dict(eval_steps=0, eval_every=0), True),
])
def test_cross_field_checks(values, ok):
    if ok:
        assert presets.validate_values(values) == values
    else:
        with pytest.raises(PresetError):
            presets.validate_values(values)


def test_a_check_with_a_missing_field_is_left_to_the_node():
    # without steps the window cannot be checked; without sde_kind the noise level neither
    assert presets.validate_values(dict(step_mode="fixed_window", window_size=900, window_start=50))
    assert presets.validate_values(dict(noise_level=4.0))


def test_preset_checks_family_and_values_at_construction():
    with pytest.raises(PresetError, match="family 'Flux.2' is not a model family name"):
        Preset("x", "x", "Flux.2", "", "", {})
    assert Preset("x", "x", "wan22_t2v", "", "", {}).family == "wan22_t2v"
    with pytest.raises(PresetError, match="unknown field 'stepz'.*did you mean 'steps'"):
        Preset("x", "x", "sd3", "", "", {"stepz": 3})
    preset = Preset("x", "x", "flux", "", "", {"alpha": 4})
    assert preset.values["alpha"] == 4.0 and isinstance(preset.values["alpha"], float)
