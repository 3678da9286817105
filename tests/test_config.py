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
