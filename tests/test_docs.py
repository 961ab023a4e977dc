"""The tests the documents name exist: a test that moves or is renamed must
take its mentions along (docs/guarantees.md names the test behind each
promise)."""

import ast
import glob
import os
import re

import pytest

from tests.helpers import REPO

DOCUMENTS = ["README.md", "benchmarks/README.md", "docs/*.md"]
# `tests/test_x.py::test_y`, `tests/test_x.py`, or a bare `test_y`.
MENTION = re.compile(r"(tests/test_\w+\.py)(?:::(test_\w+))?|`(test_\w+)`")


def _test_names(path: str) -> set:
  with open(path, encoding="utf-8") as handle:
    tree = ast.parse(handle.read())
  return {node.name for node in tree.body
          if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def _mentions() -> list:
  found = []
  for pattern in DOCUMENTS:
    for path in sorted(glob.glob(os.path.join(REPO, pattern))):
      with open(path, encoding="utf-8") as handle:
        text = handle.read()
      found += [(os.path.relpath(path, REPO), match.groups())
                for match in MENTION.finditer(text)]
  return found


def test_every_test_the_documents_name_exists():
  mentions = _mentions()
  assert any(test or bare for _, (_, test, bare) in mentions), "none named"
  every_name = set()
  for path in glob.glob(os.path.join(REPO, "tests", "test_*.py")):
    every_name |= _test_names(path)
  missing = []
  for document, (test_file, test, bare) in mentions:
    if test_file and not os.path.isfile(os.path.join(REPO, test_file)):
      missing.append(f"{document}: {test_file}")
    elif test and test not in _test_names(os.path.join(REPO, test_file)):
      missing.append(f"{document}: {test_file}::{test}")
    elif bare and bare not in every_name:
      missing.append(f"{document}: {bare}")
  if missing:
    pytest.fail("named in the documents but not found:\n" + "\n".join(missing))
