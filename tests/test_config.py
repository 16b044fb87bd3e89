"""Recipe loading: files, overrides, every problem reported at once, semantic rules, TOML round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tuner.config.load import check_recipe, load_recipe, recipe_hash, recipe_to_dict, recipe_to_toml
from tuner.config.schema import Recipe
from tuner.errors import RecipeError, TunerError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(*args, **kwargs) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(*args, **kwargs)
    return info.value.problems


def only_problem(*args, **kwargs) -> str:
    problems = problems_of(*args, **kwargs)
    assert len(problems) == 1, problems
    return problems[0]


# --- loading -------------------------------------------------------------------------------------------


def test_defaults_load_and_pass_the_semantic_checks():
    assert load_recipe(None) == Recipe()
    assert check_recipe(Recipe()) == []


def test_toml_file_loads(tmp_path):
    path = write(tmp_path, "r.toml", """
[model]
base = "/models/sd15"
[adapter]
targets = "locon"
rank = 16
alpha = 8
[optim]
betas = [0.9, 0.99]
learning_rate = 1e-4
[preview]
every = 50
prompts = ["a cat", "a dog"]
""")
    recipe = load_recipe(path)
    assert recipe.model.base == "/models/sd15"
    assert recipe.adapter.targets == "locon"
    assert recipe.adapter.rank == 16
    assert recipe.optim.betas == [0.9, 0.99]
    assert recipe.optim.learning_rate == 1e-4
    assert recipe.preview.prompts == ["a cat", "a dog"]
    assert recipe.train == Recipe().train  # untouched tables keep the schema defaults


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_file_loads(tmp_path, suffix):
    path = write(tmp_path, "r" + suffix, """
data:
  path: datasets/cats
  flip: true
  caption_dropout: 0.1
train:
  mixed_precision: "no"
  steps: 10
optim:
  learning_rate: 1.0e-4
output:
  trigger_words: [sks, cat]
""")
    recipe = load_recipe(path)
    assert recipe.data.path == "datasets/cats"
    assert recipe.data.flip is True
    assert recipe.data.caption_dropout == 0.1
    assert recipe.train.mixed_precision == "no"
    assert recipe.train.steps == 10
    assert recipe.optim.learning_rate == 1e-4
    assert recipe.output.trigger_words == ["sks", "cat"]


def test_empty_yaml_file_means_defaults(tmp_path):
    assert load_recipe(write(tmp_path, "r.yaml", "")) == Recipe()


def test_int_is_accepted_for_float_and_converted(tmp_path):
    recipe = load_recipe(write(tmp_path, "r.toml", "[adapter]\nalpha = 8\n[optim]\nbetas = [0, 0]\n"))
    assert recipe.adapter.alpha == 8.0 and isinstance(recipe.adapter.alpha, float)
    assert all(isinstance(b, float) for b in recipe.optim.betas)
    # so "alpha = 8" and "alpha = 8.0" describe the same run
    assert recipe_hash(recipe) == recipe_hash(load_recipe(None, ["adapter.alpha=8.0", "optim.betas=[0.0,0.0]"]))


# --- overrides -----------------------------------------------------------------------------------------


def test_precedence_file_then_set_then_shortcuts(tmp_path):
    path = write(tmp_path, "r.toml", "[train]\nsteps = 100\nseed = 1\nbatch_size = 3\n")
    recipe = load_recipe(path, ["train.steps=200", "train.seed=2"], {"train.steps": 300, "train.batch_size": None})
    assert recipe.train.steps == 300  # shortcut beats --set beats file
    assert recipe.train.seed == 2  # --set beats file
    assert recipe.train.batch_size == 3  # a None shortcut is ignored


def test_set_values_are_parsed_as_toml_then_as_text():
    recipe = load_recipe(None, [
        "train.steps=10",
        "optim.betas=[0.9,0.99]",
        'preview.prompts=["a","b"]',
        "data.flip=true",
        "model.base=/some/path",
        "train.mixed_precision=bf16",
        "output.name=123",  # a text field keeps the text even though it reads as an int
        'output.dir="runs/with space"',
    ])
    assert recipe.train.steps == 10
    assert recipe.optim.betas == [0.9, 0.99]
    assert recipe.preview.prompts == ["a", "b"]
    assert recipe.data.flip is True
    assert recipe.model.base == "/some/path"
    assert recipe.train.mixed_precision == "bf16"
    assert recipe.output.name == "123"
    assert recipe.output.dir == "runs/with space"


def test_set_type_errors_and_malformed_override_are_reported_together():
    problems = problems_of(None, ["train.steps=ten", "data.flip=yes", "train.steps", "=3"])
    assert len(problems) == 4, problems
    assert "--set: train.steps = 'ten': expected int" in problems[0]
    assert "--set: data.flip = 'yes': expected bool" in problems[1]
    assert "'train.steps'" in problems[2] and "expected dotted.key=value" in problems[2]
    assert "'=3'" in problems[3] and "expected dotted.key=value" in problems[3]


def test_set_value_cannot_smuggle_a_second_key():
    assert "--set: train.steps = '1\\ntrain.seed = 5': expected int" in only_problem(
        None, ["train.steps=1\ntrain.seed = 5"])


def test_shortcut_values_are_checked():
    assert "command line: train.steps = '10': expected int" in only_problem(None, shortcuts={"train.steps": "10"})


# --- type and key problems -----------------------------------------------------------------------------


def test_every_problem_in_a_file_is_reported_with_file_key_value_and_expected(tmp_path):
    path = write(tmp_path, "bad.toml", """
[train]
steps = "many"
batch_size = 2.5
[adapter]
targets = "everything"
[data]
flip = 1
""")
    problems = problems_of(path)
    assert len(problems) == 4, problems
    for problem, key, value, expected in [
        (problems[0], "train.steps", "'many'", "expected int"),
        (problems[1], "train.batch_size", "2.5", "expected int"),
        (problems[2], "adapter.targets", "'everything'", "expected one of"),
        (problems[3], "data.flip", "1", "expected bool"),
    ]:
        assert str(path) in problem and key in problem and f"= {value}" in problem and expected in problem


def test_bool_is_not_an_int_or_a_float(tmp_path):
    path = write(tmp_path, "r.yaml", "train:\n  steps: true\nadapter:\n  alpha: false\n")
    problems = problems_of(path)
    assert "train.steps = True: expected int" in problems[0]
    assert "adapter.alpha = False: expected float" in problems[1]


def test_literal_error_lists_the_choices(tmp_path):
    problem = only_problem(write(tmp_path, "r.toml", '[optim]\noptimizer = "sgd"\n'))
    assert "optim.optimizer = 'sgd': expected one of 'adamw', 'adamw8bit'" in problem


def test_yaml_no_for_a_choice_explains_the_boolean(tmp_path):
    problem = only_problem(write(tmp_path, "r.yaml", "train:\n  mixed_precision: no\n"))
    assert "train.mixed_precision = False: expected one of 'no', 'fp16', 'bf16'" in problem
    assert "quotes" in problem


def test_yaml_exponent_without_dot_is_text_and_says_so(tmp_path):
    problem = only_problem(write(tmp_path, "r.yaml", "optim:\n  learning_rate: 1e-4\n"))
    assert "optim.learning_rate = '1e-4': expected float" in problem and "1.0e-4" in problem


def test_list_types_are_checked_element_by_element(tmp_path):
    path = write(tmp_path, "r.toml", '[optim]\nbetas = [0.9, "x"]\n[preview]\nprompts = "a cat"\n'
                                     '[output]\ntrigger_words = ["ok", 3]\n')
    problems = problems_of(path)
    assert len(problems) == 3, problems
    assert "optim.betas = [0.9, 'x']: expected a list of float" in problems[0]
    assert "preview.prompts = 'a cat': expected a list of str" in problems[1]
    assert "output.trigger_words = ['ok', 3]: expected a list of str" in problems[2]


@pytest.mark.parametrize("text, shown", [("nan", "nan"), ("-inf", "-inf"), ("1" + "0" * 400, "1000")])
def test_non_finite_float_is_rejected(tmp_path, text, shown):
    problem = only_problem(write(tmp_path, "r.toml", f"[optim]\nlearning_rate = {text}\n"))
    assert f"optim.learning_rate = {shown}" in problem and "expected float" in problem


def test_files_take_only_real_booleans(tmp_path):
    problem = only_problem(write(tmp_path, "r.yaml", 'data:\n  flip: "true"\n'))
    assert "data.flip = 'true': expected bool" in problem


def test_unknown_key_gets_did_you_mean(tmp_path):
    path = write(tmp_path, "r.toml", "[optim]\nlearning_rat = 1e-3\n")
    problem = only_problem(path)
    assert str(path) in problem and "unknown key optim.learning_rat = 0.001" in problem
    assert "did you mean optim.learning_rate?" in problem


def test_unknown_table_gets_did_you_mean(tmp_path):
    problem = only_problem(write(tmp_path, "r.toml", "[trian]\nsteps = 5\n"))
    assert "unknown key trian = {'steps': 5}" in problem and "did you mean train?" in problem


def test_misplaced_key_suggests_the_full_dotted_key(tmp_path):
    path = write(tmp_path, "r.toml", "steps = 10\n[train]\nlearning_rate = 1e-3\n")
    top, nested = problems_of(path)
    assert "unknown key steps = 10" in top and "train.steps" in top and "preview.steps" in top
    assert "unknown key train.learning_rate" in nested
    assert "did you mean embedding.learning_rate or optim.learning_rate?" in nested


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    problem = only_problem(None, ["model.zzz=1"])
    assert "--set: unknown key model.zzz = 1; expected one of model.base" in problem


def test_scalar_where_a_table_belongs(tmp_path):
    problem = only_problem(write(tmp_path, "r.toml", 'train = 5\n'))
    assert "train = 5: expected a table with keys steps, batch_size" in problem


# --- semantic rules ------------------------------------------------------------------------------------

SEMANTIC_CASES = [
    ("prior.batch_size=0", "prior.batch_size = 0: expected >= 1"),
    ("adapter.rank=0", "adapter.rank = 0: expected >= 1"),
    ("adapter.alpha=0", "adapter.alpha = 0.0: expected > 0"),
    ("adapter.conv_rank=0", "adapter.conv_rank = 0: expected >= 1"),
    ("adapter.conv_alpha=-1", "adapter.conv_alpha = -1.0: expected > 0"),
    ("adapter.text_encoder_rank=-1", "adapter.text_encoder_rank = -1: expected >= 0"),
    ("adapter.dropout=1.0", "adapter.dropout = 1.0: expected in [0, 1)"),
    ("adapter.dropout=-0.1", "adapter.dropout = -0.1: expected in [0, 1)"),
    ("data.caption_dropout=1.5", "data.caption_dropout = 1.5: expected in [0, 1]"),
    ("train.steps=0", "train.steps = 0: expected >= 1"),
    ("train.batch_size=0", "train.batch_size = 0: expected >= 1"),
    ("train.gradient_accumulation=0", "train.gradient_accumulation = 0: expected >= 1"),
    ("optim.learning_rate=0", "optim.learning_rate = 0.0: expected > 0"),
    ("data.repeats=0", "data.repeats = 0: expected >= 1"),
    ("data.resolution=4", "data.resolution = 4: expected 0 (native) or a multiple of 8"),
    ("data.resolution=513", "data.resolution = 513: expected 0 (native) or a multiple of 8"),
    ("data.keep_tags=-1", "data.keep_tags = -1: expected >= 0"),
    ("train.checkpoint_every=-5", "train.checkpoint_every = -5: expected >= 0"),
    ("preview.every=-1", "preview.every = -1: expected >= 0"),
    ("optim.betas=[0.9]", "optim.betas = [0.9]: expected 2 numbers in [0, 1)"),
    ("optim.betas=[0.9,1.0]", "optim.betas = [0.9, 1.0]: expected 2 numbers in [0, 1)"),
    ("optim.warmup_steps=-1", "optim.warmup_steps = -1: expected >= 0"),
    ("adapter.text_encoder_alpha=-1", "adapter.text_encoder_alpha = -1.0: expected >= 0"),
    ("train.min_snr_gamma=-1", "train.min_snr_gamma = -1.0: expected >= 0"),
    ("train.noise_offset=-0.1", "train.noise_offset = -0.1: expected >= 0"),
    ("train.max_grad_norm=-1", "train.max_grad_norm = -1.0: expected >= 0"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints = -1: expected >= 0"),
    ("optim.text_encoder_lr=-1e-4", "optim.text_encoder_lr = -0.0001: expected >= 0"),
    ("optim.weight_decay=-0.01", "optim.weight_decay = -0.01: expected >= 0"),
    ("optim.eps=0", "optim.eps = 0.0: expected > 0"),
    ("preview.steps=0", "preview.steps = 0: expected >= 1"),
    ('output.name=""', "output.name = '': expected a non-empty file stem"),
    ("output.name=a/b", "output.name = 'a/b': expected a non-empty file stem without"),
    ("output.name=a\\b", "output.name = 'a\\\\b': expected a non-empty file stem without"),
]


@pytest.mark.parametrize("override, message", SEMANTIC_CASES)
def test_semantic_rule(override, message):
    problem = only_problem(None, [override])
    assert problem.startswith("--set: ") and message in problem


@pytest.mark.parametrize("override", ["adapter.rank=1", "train.steps=1", "train.max_grad_norm=0",
                                      "data.resolution=0", "data.resolution=8", "data.resolution=512",
                                      "adapter.text_encoder_rank=0", "data.caption_dropout=1.0",
                                      "adapter.dropout=0.0", "optim.betas=[0.0,0.999]"])
def test_semantic_rule_boundaries_are_accepted(override):
    load_recipe(None, [override])


def test_random_crop_needs_uncached_latents(tmp_path):
    path = write(tmp_path, "r.toml", "[data]\ncenter_crop = false\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}: data.center_crop = False with train.cache_latents = True")
    assert "because cached latents fix the crop" in problem
    assert load_recipe(path, ["train.cache_latents=false"]).data.center_crop is False


def test_previews_need_prompts():
    problem = only_problem(None, ["preview.every=50"])
    assert "preview.prompts = []: expected at least one prompt when preview.every = 50" in problem
    assert load_recipe(None, ["preview.every=50", 'preview.prompts=["a cat"]']).preview.every == 50


def test_check_recipe_on_a_built_recipe():
    recipe = Recipe()
    recipe.adapter.rank = 0
    recipe.train.steps = 0
    assert check_recipe(recipe) == ["adapter.rank = 0: expected >= 1", "train.steps = 0: expected >= 1"]


def test_type_and_semantic_problems_are_raised_together(tmp_path):
    path = write(tmp_path, "r.toml", "[adapter]\nrank = 0\nalpah = 4.0\n")
    problems = problems_of(path, ["train.steps=x"])
    assert len(problems) == 3, problems
    assert "alpah" in problems[0] and "train.steps = 'x'" in problems[1] and "adapter.rank = 0" in problems[2]
    assert problems[2].startswith(str(path))  # the semantic problem names the file that set the value


# --- file errors ---------------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(TunerError, match="not found") as info:
        load_recipe(path)
    assert str(path) in str(info.value)


def test_unsupported_extension_lists_the_accepted_ones(tmp_path):
    with pytest.raises(TunerError) as info:
        load_recipe(write(tmp_path, "r.json", "{}"))
    assert "r.json" in str(info.value) and ".toml, .yaml, .yml" in str(info.value)


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "broken.toml", "[train]\nsteps = 10\nseed = = 3\n")
    with pytest.raises(TunerError) as info:
        load_recipe(path)
    assert not isinstance(info.value, RecipeError)
    assert str(path) in str(info.value) and "line 3" in str(info.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "broken.yaml", "train:\n  steps: 10\n  seed: [1, 2\nadapter: {}\n")
    with pytest.raises(TunerError) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and "line 4" in str(info.value)


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(TunerError, match="expected a mapping"):
        load_recipe(write(tmp_path, "r.yaml", "- a\n- b\n"))


# --- writing and hashing -------------------------------------------------------------------------------


def odd_recipe() -> Recipe:
    recipe = Recipe()
    recipe.data.instance_prompt = 'a "quoted" \\ back\tslash\nnew line \x01 \x7f é 猫'
    recipe.optim.learning_rate = 1.2345678901234567e-05
    recipe.optim.eps = 1e-20
    recipe.optim.betas = [0.1, 0.30000000000000004]
    recipe.adapter.alpha = 3.0
    recipe.train.steps = 12345
    recipe.data.flip = True
    recipe.preview.prompts = ["one", 'two "2"', ""]
    recipe.output.trigger_words = []
    return recipe


@pytest.mark.parametrize("recipe", [Recipe(), odd_recipe()], ids=["defaults", "odd"])
def test_recipe_to_toml_round_trips(tmp_path, recipe):
    path = write(tmp_path, "out.toml", recipe_to_toml(recipe))
    loaded = load_recipe(path)
    assert loaded == recipe
    assert recipe_to_dict(loaded) == recipe_to_dict(recipe)


def test_recipe_to_dict_is_plain_and_complete():
    data = recipe_to_dict(Recipe())
    assert set(data) == {f.name for f in dataclasses.fields(Recipe)}
    assert data["train"]["steps"] == 400 and data["optim"]["betas"] == [0.9, 0.999]


def test_recipe_hash_is_stable_and_sensitive():
    assert recipe_hash(Recipe()) == recipe_hash(Recipe())
    assert len(recipe_hash(Recipe())) == 16 and int(recipe_hash(Recipe()), 16) >= 0
    assert recipe_hash(Recipe()) != recipe_hash(load_recipe(None, ["train.seed=1"]))
    assert recipe_hash(odd_recipe()) != recipe_hash(Recipe())


def test_recipe_hash_survives_the_toml_round_trip(tmp_path):
    path = write(tmp_path, "out.toml", recipe_to_toml(odd_recipe()))
    assert recipe_hash(load_recipe(path)) == recipe_hash(odd_recipe())
