"""The CLI-wide guard: every subcommand, given hostile input, exits non-zero with one message
line (and at most one "fix:" line after it), never a traceback. An unexpected exception is one
line naming it and a pointer to --debug, which shows the traceback.

Every case is the real CLI (`python -m compressor.cli`, the console script's `main`) as a
process; the cases run a few at a time, since each spends most of its time importing.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from compressor.testing.generate import LlamaShape, generate_llama_checkpoint
from tests.reliability._util import CLI, cli_env

REPO = Path(__file__).resolve().parents[2]
TINY = LlamaShape(hidden_size=64, intermediate_size=128, num_hidden_layers=1, vocab_size=128)

# (case id, arguments after the CLI, with {missing}, {garbage}, {truncated}, {truncated_dir},
# {existing} standing for the paths the `inputs` fixture makes, {out} for a new path per case)
CASES = [
    ("compress-missing", ["compress", "{missing}", "{out}"]),
    ("compress-garbage-dir", ["compress", "{garbage}", "{out}"]),
    ("compress-truncated", ["compress", "{truncated}", "{out}"]),
    ("compress-invalid-value", ["compress", "{existing}", "{out}", "--workers", "many"]),
    ("compress-unknown-option", ["compress", "{existing}", "{out}", "--bogus"]),
    ("compress-unknown-preset", ["compress", "{existing}", "{out}", "--preset", "w5"]),
    ("compress-missing-argument", ["compress", "{existing}"]),
    ("compress-gptq-uncalibrated", ["compress", "{existing}", "{out}", "--method", "gptq"]),
    (
        "compress-calibration-unused",
        ["compress", "{existing}", "{out}", "--calibration", "{garbage}/notes.bin"],
    ),
    (
        "compress-calibration-missing",
        ["compress", "{existing}", "{out}", "--method", "gptq", "--calibration", "{missing}"],
    ),
    (
        "compress-calibration-binary",
        [
            "compress",
            "{existing}",
            "{out}",
            "--method",
            "gptq",
            "--calibration",
            "{garbage}/notes.bin",
        ],
    ),
    (
        "compress-calibration-options-uncalibrated",
        ["compress", "{existing}", "{out}", "--method", "gptq", "--no-act-order"],
    ),
    (
        "compress-no-act-order-without-gptq",
        [
            "compress",
            "{existing}",
            "{out}",
            "--rounding",
            "hqq",
            "--calibration",
            "{garbage}/notes.bin",
            "--no-act-order",
        ],
    ),
    ("inspect-missing", ["inspect", "{missing}"]),
    ("inspect-garbage-dir", ["inspect", "{garbage}"]),
    ("inspect-truncated", ["inspect", "{truncated}"]),
    ("decompress-missing", ["decompress", "{missing}", "{out}"]),
    ("decompress-garbage-dir", ["decompress", "{garbage}", "{out}"]),
    ("decompress-truncated", ["decompress", "{truncated_dir}", "{out}"]),
    ("verify-missing", ["verify", "{missing}"]),
    ("verify-a-file", ["verify", "{truncated}"]),
    ("eval-missing", ["eval", "{missing}", "{missing}"]),
    ("eval-garbage-dirs", ["eval", "{garbage}", "{truncated_dir}"]),
    ("generate-zero-width", ["generate", "{out}", "--hidden-size", "0"]),
    ("generate-bad-dtype", ["generate", "{out}", "--dtype", "F8"]),
    ("generate-existing", ["generate", "{existing}"]),
    ("fetch-unknown-model", ["fetch", "no-such-model"]),
    ("serve-bad-cron", ["serve", "--cron", "bad", "--source", "{missing}", "--destination", "x"]),
    ("serve-cron-without-source", ["serve", "--cron", "0 2 * * *"]),
    ("serve-invalid-value", ["serve", "--workers", "many"]),
    ("unknown-command", ["squash", "{existing}"]),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("guard")
    existing = generate_llama_checkpoint(root / "tiny", TINY, dtype="BF16", seed=6)
    garbage = root / "garbage"
    garbage.mkdir()
    (garbage / "model.safetensors").write_bytes(bytes(range(256)) * 12)
    (garbage / "config.json").write_text("{not json")
    (garbage / "notes.bin").write_bytes(b"\x80\x04junk" * 100)
    truncated_dir = root / "truncated"
    truncated_dir.mkdir()
    whole = (existing / "model.safetensors").read_bytes()
    (truncated_dir / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    (truncated_dir / "config.json").write_bytes((existing / "config.json").read_bytes())
    return {
        "missing": root / "does-not-exist",
        "garbage": garbage,
        "truncated": truncated_dir / "model.safetensors",
        "truncated_dir": truncated_dir,
        "existing": existing,
        "root": root,
    }


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    # The timeout only bounds a case that would hang (e.g. `serve` starting to serve).
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=cli_env(**env), timeout=240
    )


@pytest.fixture(scope="module")
def results(inputs: dict[str, Path]) -> dict[str, subprocess.CompletedProcess[str]]:
    def run(case: tuple[str, list[str]]) -> subprocess.CompletedProcess[str]:
        paths = {**inputs, "out": inputs["root"] / f"out-{case[0]}"}  # one per case
        return _run([arg.format(**paths) for arg in case[1]])

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip([c[0] for c in CASES], pool.map(run, CASES), strict=True))


def assert_one_message(done: subprocess.CompletedProcess[str]) -> str:
    """Non-zero exit, no traceback, and the message: one `error:` line, then at most a `fix:`
    line and nothing else (log lines of a library may come before it). Returns the error line."""
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [k for k, line in enumerate(lines) if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    rest = lines[errors[0] + 1 :]
    assert rest == [] or (len(rest) == 1 and rest[0].lstrip().startswith("fix:")), done.stderr
    return lines[errors[0]]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_every_subcommand_fails_with_one_message(
    case: str, results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    assert_one_message(results[case])


def test_usage_errors_point_at_help(results: dict[str, subprocess.CompletedProcess[str]]) -> None:
    done = results["compress-invalid-value"]
    assert done.returncode == 2
    assert "'--workers'" in assert_one_message(done)
    assert "compress --help" in done.stderr
    assert "No such command 'squash'" in assert_one_message(results["unknown-command"])


def test_calibration_options_that_would_do_nothing_are_refused_by_name(
    results: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    line = assert_one_message(results["compress-calibration-options-uncalibrated"])
    assert "--act-order/--no-act-order" in line and "without --calibration FILE" in line
    line = assert_one_message(results["compress-no-act-order-without-gptq"])
    assert "--no-act-order" in line and "rounding gptq" in line


# An exception nothing expects, raised inside a command: `inspect` calls a function that fails.
BUG = (
    "import sys\n"
    "import compressor.formats.compressed as compressed\n"
    "def broken(path):\n"
    "    raise RuntimeError('the first line\\nand a second one')\n"
    "compressed.inspect_checkpoint = broken\n"
    "from compressor.cli import main\n"
    "sys.argv = ['compressor', *sys.argv[1:]]\n"
    "main()\n"
)


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", BUG, "inspect", str(tmp_path)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=240,
    )
    assert done.returncode == 1
    line = assert_one_message(done)
    assert line == "error: RuntimeError: the first line and a second one"
    assert "--debug" in done.stderr

    for args, env in (
        (["--debug", "inspect", str(tmp_path)], {}),
        (["inspect", str(tmp_path)], {"COMPRESSOR_DEBUG": "1"}),
    ):
        debug = subprocess.run(
            [sys.executable, "-c", BUG, *args],
            capture_output=True,
            text=True,
            env=cli_env(**env),
            timeout=240,
        )
        assert debug.returncode == 1
        assert "Traceback" in debug.stderr and "in broken" in debug.stderr, debug.stderr
        assert "RuntimeError: the first line" in debug.stderr


def test_console_script_is_the_guarded_main() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '\ncompressor = "compressor.cli:main"\n' in pyproject


def test_serve_checks_its_schedule_and_default_run_before_serving(
    results: dict[str, subprocess.CompletedProcess[str]], inputs: dict[str, Path]
) -> None:
    line = assert_one_message(results["serve-bad-cron"])
    assert "--cron 'bad' is not a valid cron schedule" in line  # a user's typo, not "a bug"
    assert results["serve-bad-cron"].returncode == 2
    bad_preset = _run(
        ["serve", "--source", str(inputs["existing"]), "--destination", "x", "--preset", "w9"]
    )
    assert "invalid default run: preset" in assert_one_message(bad_preset)
