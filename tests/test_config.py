"""The run form's preset field (the flow's parameter schema, which the Prefect UI renders) says
in one line per preset what it stores and where it runs."""

from __future__ import annotations

from typing import get_args

from compressor.config import PRESET_NOTES, PRESETS, Preset, RunConfig


def test_every_preset_has_a_note_and_the_form_shows_them() -> None:
    assert set(PRESET_NOTES) == set(get_args(Preset))
    assert set(PRESETS) | {"recipe"} == set(PRESET_NOTES)
    described = RunConfig.model_json_schema()["properties"]["preset"]["description"]
    for name, note in PRESET_NOTES.items():
        assert f"{name}: {note}" in described


def test_recipe_yaml_text_or_path_replaces_the_recipe_fields(tmp_path) -> None:
    """The run form's recipe_yaml: YAML text or a recipe file's path, parsed into `recipe`; the
    preset's rules apply unless it brings its own (then preset 'recipe'); a recipe set in both
    places, bad YAML, a missing file and a non-mapping are refused with what to do."""
    import pytest
    from pydantic import ValidationError

    from compressor.config import PRESETS, RunConfig

    base = {"source": "/x", "destination": "/y"}
    form_defaults = {"version": 1, "pruning": None, "budget": None}
    text = "pruning:\n  sparsity: 0.25\n"
    c = RunConfig.model_validate(
        {**base, "preset": "w8a16", "recipe": form_defaults, "recipe_yaml": text}
    )
    assert c.recipe.quantization == PRESETS["w8a16"].quantization
    assert c.recipe.pruning is not None and c.recipe.pruning.sparsity == 0.25
    assert c.recipe_yaml is None  # consumed: the run key sees the recipe only
    file = tmp_path / "r.yaml"
    file.write_text("quantization:\n  - bits: 3\n    group_size: 64\n")
    c = RunConfig.model_validate({**base, "preset": "recipe", "recipe_yaml": str(file)})
    assert (c.recipe.quantization[0].bits, c.recipe.quantization[0].group_size) == (3, 64)
    for bad, match in (
        ({"recipe": {**form_defaults, "pruning": {"sparsity": 0.5}}}, "both given"),
        ({"recipe_yaml": "quantization: [\n"}, "not valid YAML"),
        ({"recipe_yaml": str(tmp_path / "missing.yaml")}, "cannot read recipe file"),
        ({"recipe_yaml": "- 1\n- 2\n"}, "must be a YAML mapping"),
        ({"recipe_yaml": str(file), "preset": "w8a16"}, "disagree"),
    ):
        data = {**base, "recipe_yaml": text, **bad}
        with pytest.raises(ValidationError, match=match):
            RunConfig.model_validate(data)
