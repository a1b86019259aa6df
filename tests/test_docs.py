"""The generated docs cannot drift: every spec field has a docstring, and the generated spec
reference lists every field of every model a spec reaches, with that docstring."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _generator()
MODELS = list(gen.walk(gen.root_model()))


def test_the_walk_reaches_the_nested_models():
    names = {m.__name__ for m in MODELS}
    # a few that sit two or three levels down, in other modules: the walk follows the fields
    assert {"SweepSpec", "Defence", "DataSource", "Attacker", "Stage", "Trainability", "LmEval"} <= names


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_spec_field_has_a_docstring(model):
    docs = gen.field_docs(model, MODELS)
    missing = [name for name in model.model_fields if not docs.get(name, "").strip()]
    assert not missing, (f"{model.__name__}: fields without a docstring: {', '.join(missing)}; write a "
                         f"\"\"\"...\"\"\" string on the line under each (it is the spec reference's text)")


def test_the_spec_reference_lists_every_field_with_its_docstring():
    page = gen.spec_page()
    sections = dict(re.findall(r"^## (\w+) \{#\w+\}\n(.*?)(?=^## |\Z)", page, flags=re.M | re.S))
    assert set(sections) == {m.__name__ for m in MODELS}
    for model in MODELS:
        rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \|.*\| ([^|]*) \|$", sections[model.__name__],
                                                             flags=re.M)}
        assert sorted(rows) == sorted(info.alias or n for n, info in model.model_fields.items()), model.__name__
        for name, doc in gen.field_docs(model, MODELS).items():
            written = model.model_fields[name].alias or name
            assert rows[written] == gen.cell(doc), f"{model.__name__}.{name}"


def test_the_cli_reference_has_every_command_and_option():
    import argparse

    from orchestrator.cli import build_parser

    page = gen.cli_page()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert f"## attack-sweep {name}\n" in page
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in page, f"{name} {flag}"
