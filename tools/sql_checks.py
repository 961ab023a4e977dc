"""The second layer of the SQL sandbox: which statements `sql` may run.

The locked connection (tools/sandbox.py) is the boundary; these checks refuse,
in one line and before DuckDB runs anything, every statement that is not one
read-only query over the views, so that a user learns why at once.
"""

import duckdb



class QueryError(ValueError):
  """A folder, statement or request that cannot be answered."""


# Statement kinds `sql` runs: queries, and EXPLAIN of a query. DESCRIBE,
# SUMMARIZE, SHOW, VALUES and FROM-first queries are SELECTs to DuckDB.
READ_ONLY_STATEMENTS = ("SELECT", "PIVOT", "EXPLAIN SELECT", "EXPLAIN PIVOT")
# Keywords no read-only query needs; a query holding one is refused. This
# catches what a statement's type hides, such as a COPY inside WITH.
DENIED_KEYWORDS = frozenset((
    "ALTER", "ATTACH", "CALL", "CHECKPOINT", "COPY", "CREATE", "DELETE",
    "DETACH", "DROP", "EXPORT", "FORCE", "IMPORT", "INSERT", "INSTALL", "LOAD",
    "MERGE", "PRAGMA", "RESET", "SET", "TRUNCATE", "UPDATE", "USE", "VACUUM"))
# Table functions that read files or run SQL from a string; a query over
# the views needs none of them.
DENIED_FUNCTION_PREFIXES = ("read_", "parquet_", "sniff_", "iceberg_",
                            "delta_")
DENIED_FUNCTIONS = frozenset(("glob", "query", "query_table", "duckdb_secrets",
                              "which_secret", "load_aws_credentials"))


def _tokens(sql: str) -> list:
  """(position, type, text) of each token of `sql`, comments left out."""
  marks = duckdb.tokenize(sql)
  tokens = []
  for i, (position, kind) in enumerate(marks):
    end = marks[i + 1][0] if i + 1 < len(marks) else len(sql)
    if kind != duckdb.token_type.comment:
      tokens.append((position, kind, sql[position:end].strip()))
  return tokens


def _explained(sql: str) -> str:
  """The statement after EXPLAIN [ANALYZE | (options)]."""
  tokens = _tokens(sql)
  i = 1
  if i < len(tokens) and tokens[i][2].upper() in ("ANALYZE", "ANALYSE"):
    i += 1
  elif i < len(tokens) and tokens[i][2] == "(":
    depth = 0
    while i < len(tokens):
      depth += tokens[i][2] == "("
      depth -= tokens[i][2] == ")"
      i += 1
      if depth == 0:
        break
  return sql[tokens[i][0]:] if i < len(tokens) else ""


def statement_kind(sql: str) -> str:
  """SELECT, PIVOT, EXPLAIN SELECT, ... or the type of a refused statement."""
  try:
    statements = duckdb.extract_statements(sql)
  except duckdb.Error as error:
    raise QueryError(f"cannot parse SQL: {error}") from None
  if len(statements) != 1:
    raise QueryError(f"expected one SQL statement, got {len(statements)}")
  try:
    kind = statements[0].type.name
  except ValueError:
    return "UNKNOWN"  # A type this DuckDB's Python API has no name for.
  tokens = _tokens(sql)
  if kind == "MULTI" and tokens and tokens[0][2].upper() in (
      "PIVOT", "PIVOT_WIDER"):
    return "PIVOT"
  if kind == "EXPLAIN":
    return "EXPLAIN " + statement_kind(_explained(sql))
  return kind


def check_read_only(sql: str) -> None:
  """Refuses, in one line, anything but one query or EXPLAIN of a query."""
  kind = statement_kind(sql)
  if kind not in READ_ONLY_STATEMENTS:
    raise QueryError(f"only read-only queries are allowed (SELECT, WITH, "
                     f"EXPLAIN, DESCRIBE, SUMMARIZE, PIVOT), not {kind}")
  tokens = _tokens(sql)
  denied = sorted({text.upper() for _, token, text in tokens
                   if token == duckdb.token_type.keyword and
                   text.upper() in DENIED_KEYWORDS})
  if denied:
    raise QueryError(f"only read-only queries are allowed; {', '.join(denied)} "
                     "has no place in one (quote it, \"like_this\", if it "
                     "names a column)")
  for (_, kind, text), (_, following_kind, following) in zip(tokens,
                                                             tokens[1:]):
    name = text.strip('"').lower()
    if following == "(" and kind in (duckdb.token_type.identifier,
                                      duckdb.token_type.keyword) and (
                                          name in DENIED_FUNCTIONS or
                                          name.startswith(
                                              DENIED_FUNCTION_PREFIXES)):
      raise QueryError(f"{name}() reads files or runs SQL from a string; "
                       "query the views predictions and errors instead")
    if text.upper() in ("FROM", "JOIN") and (
        following_kind == duckdb.token_type.string_const):
      raise QueryError(f"{text.upper()} {following} reads a file by name; "
                       "query the views predictions and errors instead")
