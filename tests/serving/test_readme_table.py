"""README's "Which preset runs where" table says what the vLLM judge measures: its vLLM CPU
column must agree with `test_vllm.EXPECTED` (runs / stand-in / refused) for every preset the
judge runs. Needs no vLLM: it only reads the two tables."""

from __future__ import annotations

import re

from tests.serving.test_vllm import EXPECTED, REPO


def _readme_vllm_cpu() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Which preset runs where", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        for preset in re.findall(r"`([^`]+)`", cells[0]):
            rows[preset] = cells[2]
    return rows


def test_readme_vllm_cpu_column_matches_the_judge() -> None:
    readme = _readme_vllm_cpu()
    judged = {case: exp for case, exp in EXPECTED.items() if case in readme}
    judged["--target-bits N"] = EXPECTED["target-bits-4.5"]
    assert len(judged) >= 9, sorted(readme)
    for preset, expected in judged.items():
        kind = expected[0] if isinstance(expected, tuple) else expected
        assert readme[preset].split(" ")[0] == kind, (preset, readme[preset], expected)
