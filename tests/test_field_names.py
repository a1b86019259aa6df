"""Every spec field a message names exists: a message that points at `data.prompt_template` (a
field the schema does not have) sends the user to fix the wrong thing. The source's message
strings are scanned for field paths (tests/fields.py walks them through the models); the paths
built at run time are checked on the real messages by tests/test_bad_inputs.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from fields import missing

from orchestrator.spec.model import SweepSpec

ROOT = Path(__file__).resolve().parents[1]
# a dotted path starting at a top-level field, parts filled in at run time written {}
_TOP = "|".join(SweepSpec.model_fields)
_PATH = re.compile(rf"(?<![\w./\-])(?:{_TOP})(?:\.(?:\w+|\{{\}})|\[[^\]\s]*\])+")
_OPTION = re.compile(r"(?<![\w./\-])options\.(\w+)")
_HEAD = re.compile(r"spec error: ([^\s:]+):")
_FILE = re.compile(r"\.(jsonl|json|yaml|yml|csv|py|md|db|txt|html|png)$")


def messages(source: str) -> list[tuple[int, str]]:
    """The string literals of a module that are not docstrings, an f-string's fields as {}."""
    tree = ast.parse(source)
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    inner = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            out.append((node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs | inner:
            out.append((node.lineno, node.value))
    return out


def wrong_fields(source: str) -> list[str]:
    """`line: path (part)` for each field path in a message that names no field."""
    from fields import _options

    bad = []
    for line, text in messages(source):
        paths = [m.group(0) for m in _PATH.finditer(text)] + [m.group(1) for m in _HEAD.finditer(text)]
        for path in paths:
            if not _FILE.search(path) and (part := missing(path)):
                bad.append(f"{line}: {path} ({part})")
        bad += [f"{line}: options.{name} ({name})" for name in _OPTION.findall(text) if name not in _options()]
    return sorted(dict.fromkeys(bad))


def test_the_scan_finds_a_field_that_is_not_there():
    """The guard itself: the message this test was written for, and its kin, are caught."""
    src = '''
def f(where, d):
    """data.prompt_template in a docstring is prose, not a message."""
    raise ValueError(f"spec error: data.chat_template: {where} has none; set data.chat_template: false "
                     "(prompts are wrapped by data.prompt_template)")
    raise ValueError(f"spec error: defences.{d}.adaptor: ...; fix the evaluator's options.base_uri")
    raise ValueError("spec error: prompt_format: must contain {prompt}")
'''
    assert wrong_fields(src) == ["4: data.prompt_template (prompt_template)", "6: defences.{}.adaptor (adaptor)",
                                 "6: options.base_uri (base_uri)", "7: prompt_format (prompt_format)"]
    assert wrong_fields('x = f"spec error: data.prompt_format: {v}; see conditions.trainability.eval.split"') == []


@pytest.mark.parametrize("module", sorted(str(p.relative_to(ROOT)) for top in ("orchestrator", "trainables")
                                          for p in (ROOT / top).rglob("*.py")))
def test_every_field_a_message_names_exists(module):
    assert wrong_fields((ROOT / module).read_text()) == []
