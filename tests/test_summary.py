"""Summaries group notes that differ only by the tensor they name."""

from __future__ import annotations

from compressor.summary import grouped_notes, note_lines


def test_notes_naming_many_tensors_collapse_to_one_line() -> None:
    notes = [
        *(f"model.layers.{i}.mlp.up_proj.weight: group 128 → 64 (576 inputs)" for i in range(30)),
        "model.layers.0.mlp.down_proj.weight: nvfp4 → left dense (520 inputs)",
        "bitmask storage applies to pruned tensors that are not quantized",
    ]
    grouped = grouped_notes(notes)
    assert [(what, count) for what, count, _ in grouped] == [
        ("group 128 → 64 (576 inputs)", 30),
        ("nvfp4 → left dense (520 inputs)", 1),
        ("bitmask storage applies to pruned tensors that are not quantized", 1),
    ]
    assert note_lines(notes) == [
        "group 128 → 64 (576 inputs) — 30 tensors, e.g. model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight: nvfp4 → left dense (520 inputs)",
        "bitmask storage applies to pruned tensors that are not quantized",
    ]
