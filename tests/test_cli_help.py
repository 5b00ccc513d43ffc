"""Help texts: every option explained, descriptions that match the accepted values, no mid-sentence wrapping."""

from __future__ import annotations

from click.testing import CliRunner

from effc.cli import cli
from effc.passes.base import registered_passes


def _out(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False, terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def test_eval_threads_has_help():
    text = " ".join(_out("eval", "--help").split())
    assert "--threads INTEGER RANGE Threads for the artifact and for onnxruntime" in text


def test_prune_granularity_describes_the_values_it_takes():
    (field,) = [f for f in registered_passes()["prune"].Options.__dataclass_fields__.values()
                if f.name == "granularity"]
    assert field.metadata["help"].startswith("comparison group: layer (the whole tensor) | row (each output channel)")


def test_passes_listing_wraps_at_words_with_hanging_indent():
    names = set(registered_passes())
    lines = _out("passes").splitlines()
    for line in lines:
        head = line.split(" ", 1)[0]
        # a pass line, an option line (4 spaces) or the continuation of one (indented), never a bare fragment
        assert head in names or line.startswith("    "), line
        assert len(line) <= 80, line
    assert any(line.startswith("          ") for line in lines)  # long option help continues indented


def test_compile_help_lists_the_gates():
    text = " ".join(_out("compile", "--help").split())
    for flag in ("--min-cosine X", "--max-top1-drop P", "--max-ppl-increase P", "--primary-output NAME",
                 "--keep-failed", "--strict"):
        assert flag in text
