"""Text shared by the run's summaries (CLI table, Prefect artifacts): pure and light to import."""

from __future__ import annotations

__all__ = ["grouped_notes", "note_lines"]


def grouped_notes(notes: list[str]) -> list[tuple[str, int, list[str]]]:
    """Notes that differ only by the tensor they name, grouped: (what, how many, tensors),
    first seen first. "model.layers.3.mlp.up_proj.weight: group 128 → 64 (576 inputs)" × 180
    is one line, not 180."""
    groups: dict[str, tuple[int, list[str]]] = {}
    for note in notes:
        head, sep, rest = note.partition(": ")
        if sep and " " not in head and "." in head:  # "<tensor>: <what>"
            what, tensor = rest, head
        else:
            what, tensor = note, ""
        count, tensors = groups.get(what, (0, []))
        groups[what] = (count + 1, [*tensors, tensor] if tensor else tensors)
    return [(what, count, tensors) for what, (count, tensors) in groups.items()]


def note_lines(notes: list[str]) -> list[str]:
    """One line per group of `grouped_notes`: "what — N tensors, e.g. <first>"."""
    lines = []
    for what, count, tensors in grouped_notes(notes):
        if count > 1 and tensors:
            lines.append(f"{what} — {count} tensors, e.g. {tensors[0]}")
        elif tensors:
            lines.append(f"{tensors[0]}: {what}")
        else:
            lines.append(what)
    return lines
