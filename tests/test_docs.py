"""The documentation names everything a user can set or call."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel
from typer.main import get_command

from mlaas import expr, spec
from mlaas.cli import app

ROOT = Path(__file__).resolve().parent.parent


def spec_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    nested = (spec.DataSpec, spec.Source, spec.JaggedFeature, spec.NormalizeSpec,
              spec.SplitSpec, spec.NanSpec, spec.CacheSpec, spec.RetrySpec, spec.ModelSpec,
              spec.TrainSpec, spec.EarlyStopping)
    for name, field in model.model_fields.items():
        path = prefix + name
        out.append(path)
        ann = field.annotation
        args = getattr(ann, "__args__", ()) + (ann,)
        for sub in nested:
            if any(a is sub or sub in getattr(a, "__args__", ()) for a in args):
                child = "[]." if sub in (spec.Source, spec.JaggedFeature) else "."
                out.extend(spec_fields(sub, path + child))
    return out


def test_every_spec_field_is_in_the_reference() -> None:
    text = (ROOT / "docs" / "spec.md").read_text()
    fields = spec_fields(spec.Pipeline)
    assert "data.sources[].files" in fields and "data.cache.max_bytes" in fields
    assert "train.early_stopping.patience" in fields and "model.pool" in fields
    missing = [f for f in fields if f"`{f}`" not in text]
    assert missing == []


def test_every_function_is_documented() -> None:
    text = (ROOT / "docs" / "expressions.md").read_text()
    missing = [f for f in sorted(expr.FUNCTIONS) if f not in text]
    assert missing == []


def test_every_cli_command_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = sorted(get_command(app).commands)  # type: ignore[attr-defined]
    assert "stats" in commands
    missing = [c for c in commands if f"mlaas {c}" not in readme]
    assert missing == []


def test_readme_starts_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```bash") + 3]
    assert [b.split()[0:2] for b in block] == [["make", "run"], ["make", "test"]]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1] == "make test"


def test_sample_files_match_their_recorded_checksums() -> None:
    """tests/files/README.md records where the sample files come from and their SHA-256."""
    import hashlib
    import re

    files = ROOT / "tests" / "files"
    recorded = re.findall(r"\| (uproot-\w+\.root) \| [\d,]+ \| `([0-9a-f]{64})` \|",
                          (files / "README.md").read_text())
    assert sorted(name for name, _ in recorded) == ["uproot-HZZ.root", "uproot-Zmumu.root"]
    for name, digest in recorded:
        assert hashlib.sha256((files / name).read_bytes()).hexdigest() == digest, name
