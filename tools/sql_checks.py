"""The second layer of the SQL sandbox: which statements `sql` may run.

The locked connection (tools/sandbox.py) is the boundary; these checks refuse,
in one line and before DuckDB runs anything, every statement that is not one
read-only query over the views, so that a user learns why at once.

They are an allow-list, read from DuckDB's own parse tree
(`json_serialize_sql`), so that no spelling hides a name: quoted, upper-case,
schema-qualified (`system.main.read_text`), in a lambda, a subquery or a
method call (`x.f()`). A query may call

* the scalar, aggregate and window functions and the macros this DuckDB has
  built in (`duckdb_functions()` on a fresh connection), but for those in
  NOT_FOR_QUERIES: SQL from a string, settings and variables, the log,
  sequences and the random seed, sleeping; a macro only when its own body
  calls nothing else;
* the table functions in TABLE_FUNCTIONS (rows made from their arguments);
* the views it is given (`predictions`, `errors`, ...) and its own CTEs,
  unqualified: no other table, catalog view or file name.

A PIVOT without an IN list (or with IN of a subquery) is two statements to
DuckDB and has no parse tree to read; its tokens are checked instead, by the
same lists.
"""

import functools
import json
import re
from typing import Iterable, Optional

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
# The table functions a query over the views may use: each makes rows from
# its arguments alone.
TABLE_FUNCTIONS = frozenset(("range", "generate_series", "unnest", "repeat"))
# Built-in functions that are not table functions, yet reach past the views
# or outlive the query: they run or plan SQL given as a string, read
# settings, variables or the search path, write the log, move sequences or
# the random seed, or sleep.
NOT_FOR_QUERIES = frozenset((
    "json_serialize_sql", "json_deserialize_sql", "json_serialize_plan",
    "json_execute_serialized_sql", "current_setting", "getvariable",
    "current_schemas", "in_search_path", "write_log",
    "parse_duckdb_log_message", "setseed", "nextval", "currval", "setval",
    "txid_current", "sleep_ms", "pg_sleep"))
# DuckDB's internal functions and PostgreSQL's catalog and privilege
# helpers: none has a use over the views.
NOT_FOR_QUERIES_PREFIXES = ("__internal", "pg_", "has_")
# SHOW TABLES, SHOW ALL TABLES and SHOW DATABASES: lists of the catalog.
SHOW_LISTS = frozenset(('"tables"', "__show_tables_expanded", '"databases"'))
# Longer statements are not queries someone typed.
MAX_STATEMENT_CHARACTERS = 100_000
DEFAULT_VIEWS = ("predictions", "errors")


@functools.lru_cache(maxsize=None)
def _parser() -> duckdb.DuckDBPyConnection:
  """A connection that only parses and reads its own catalog: nothing
  outside it is reachable, and it holds no data."""
  connection = duckdb.connect(config={
      "autoinstall_known_extensions": False,
      "autoload_known_extensions": False,
      "enable_external_access": False,
      "threads": 1,
      "memory_limit": "256MB",
  })
  connection.execute("SET lock_configuration = true")
  return connection


def _parse(sql: str) -> Optional[list]:
  """The parse trees of `sql`'s statements, or None when DuckDB cannot
  serialize them (any statement but SELECT)."""
  text = _parser().execute("SELECT json_serialize_sql(?::VARCHAR)",
                           [sql]).fetchone()[0]
  try:
    tree = json.loads(text)
  except (RecursionError, ValueError):
    raise QueryError("the statement is nested too deeply to check") from None
  if tree.get("error"):
    if tree.get("error_type") == "not implemented":
      return None
    raise QueryError(f"cannot parse SQL: {tree.get('error_message')}")
  return tree["statements"]


class _References:
  """What a parse tree names: functions, table functions, tables, CTEs."""

  def __init__(self):
    self.functions = set()  # names
    self.table_functions = set()  # names
    self.tables = set()  # (catalog, schema, name)
    self.shown = set()  # SHOW_REF: (show_type, name)
    self.ctes = set()  # names, lower case

  def add_tree(self, tree) -> "_References":
    table_calls = set()
    stack = [tree]
    while stack:
      node = stack.pop()
      if isinstance(node, list):
        stack.extend(node)
        continue
      if not isinstance(node, dict):
        continue
      stack.extend(node.values())
      kind = node.get("type")
      if kind == "TABLE_FUNCTION" and isinstance(node.get("function"), dict):
        table_calls.add(id(node["function"]))
        self.table_functions.add(_name(node["function"].get("function_name")))
      elif node.get("class") == "FUNCTION" and id(node) not in table_calls:
        self.functions.add(_name(node.get("function_name")))
      elif kind == "BASE_TABLE":
        self.tables.add((node.get("catalog_name") or "",
                         node.get("schema_name") or "",
                         _name(node.get("table_name"))))
      elif kind == "SHOW_REF" and node.get("show_type") in ("SHOW",
                                                            "SHOW_SPECIAL"):
        self.shown.add((node["show_type"], str(node.get("table_name"))))
      cte_map = node.get("cte_map")
      if isinstance(cte_map, dict):
        self.ctes.update(_name(entry.get("key"))
                         for entry in cte_map.get("map", [])
                         if isinstance(entry, dict))
    return self


def _name(value) -> str:
  return str(value or "").lower()


class _Catalog:
  """What this DuckDB has built in, read once from a fresh connection."""

  def __init__(self):
    connection = _parser()
    variants = connection.execute(
        "SELECT function_name, function_type, macro_definition "
        "FROM duckdb_functions()").fetchall()
    self.known = {name.lower() for name, _, _ in variants}
    expression = {name.lower() for name, kind, _ in variants
                  if kind in ("scalar", "aggregate", "window", "macro")}
    allowed = {name for name in expression
               if name not in NOT_FOR_QUERIES and
               not name.startswith(NOT_FOR_QUERIES_PREFIXES)}
    macros = {}
    for name, kind, body in variants:
      if kind == "macro" and name.lower() in allowed:
        macros.setdefault(name.lower(), []).append(body)
    # A macro is allowed when everything its body calls is; bodies call
    # other macros, so until nothing changes.
    changed = True
    while changed:
      changed = False
      for name, bodies in macros.items():
        if name in allowed and not all(
            self._body_allowed(body, allowed) for body in bodies):
          allowed.discard(name)
          changed = True
    self.functions = frozenset(allowed)
    # Catalog views (duckdb_tables, pg_settings, information_schema.*):
    # named in a table's place, the token check refuses them.
    self.system_tables = frozenset(
        row[0].lower() for row in connection.execute(
            "SELECT view_name FROM duckdb_views() WHERE internal UNION "
            "SELECT table_name FROM duckdb_tables() WHERE internal"
        ).fetchall())

  @staticmethod
  def _body_allowed(body: Optional[str], allowed: set) -> bool:
    if not body:
      return False
    try:
      statements = _parse(f"SELECT {body}")
    except QueryError:
      return False
    if not statements:
      return False
    references = _References().add_tree(statements)
    return (not references.tables and not references.table_functions and
            not references.shown and
            references.functions <= allowed | TABLE_FUNCTIONS)


@functools.lru_cache(maxsize=None)
def catalog() -> _Catalog:
  return _Catalog()


def allowed_functions() -> frozenset:
  """The functions (not table functions) a query may call."""
  return catalog().functions


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
    raise QueryError(f"cannot parse SQL: {_one_line(error)}") from None
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


def _one_line(error) -> str:
  return " ".join(str(error).split())


def _refuse_function(name: str) -> None:
  raise QueryError(f"{name}() is not among the functions a query over the "
                   "views may call (it reads files or settings, runs SQL "
                   "from a string or is unknown here); query the views "
                   "predictions and errors")


def _check_tree(statements: list, views: set) -> None:
  references = _References().add_tree(statements)
  functions = catalog().functions
  for name in sorted(references.functions):
    if name not in functions and name not in TABLE_FUNCTIONS:
      _refuse_function(name)
  for name in sorted(references.table_functions):
    if name not in TABLE_FUNCTIONS:
      _refuse_function(name)
  tables = views | references.ctes
  for catalog_name, schema, name in sorted(references.tables):
    if catalog_name or schema or name not in tables:
      shown = ".".join(part for part in (catalog_name, schema, name) if part)
      raise QueryError(f"{shown!r} is not a view of this folder: a query may "
                       f"read {', '.join(sorted(views))} and its own WITH "
                       "tables, nothing else")
  for show_type, name in sorted(references.shown):
    if not (show_type == "SHOW_SPECIAL" and name in SHOW_LISTS or
            show_type == "SHOW" and name.lower() in tables):
      raise QueryError(f"SHOW {name} is not a view of this folder: a query "
                       f"may read {', '.join(sorted(views))}")


# After these keywords comes a table (a name, a table function or a
# subquery); after a comma too while the clause at that depth is FROM.
_TABLE_CLAUSES = frozenset(("FROM", "JOIN", "PIVOT", "PIVOT_WIDER", "UNPIVOT",
                            "PIVOT_LONGER", "LATERAL", "TABLE", "DESCRIBE",
                            "SUMMARIZE", "SHOW"))
# Keywords that end a FROM list at their depth.
_OTHER_CLAUSES = frozenset(("SELECT", "WHERE", "GROUP", "HAVING", "ORDER",
                            "LIMIT", "OFFSET", "ON", "USING", "QUALIFY",
                            "WINDOW", "VALUES", "IN", "INTO", "UNION",
                            "EXCEPT", "INTERSECT", "AS", "BY", "WITH"))
_IDENTIFIERS = (duckdb.token_type.identifier, duckdb.token_type.keyword)


def _unquoted(text: str) -> str:
  if len(text) >= 2 and text[0] == text[-1] == '"':
    return text[1:-1].replace('""', '"')
  return text


def _check_tokens(sql: str, views: set) -> None:
  """The checks of a statement without a parse tree, token by token: every
  call names an allowed function, and every table is an unqualified name
  that is not a catalog view or a file."""
  names = catalog()
  tokens = _tokens(sql)
  clause = {0: None}
  depth = 0
  table_next = False
  for i, (_, kind, text) in enumerate(tokens):
    following = tokens[i + 1][2] if i + 1 < len(tokens) else ""
    upper = text.upper()
    name = _unquoted(text).lower()
    at_table = table_next
    table_next = False
    if text == "(":
      depth += 1
      clause[depth] = None
      continue
    if text == ")":
      depth = max(0, depth - 1)
      continue
    if kind == duckdb.token_type.keyword and upper in _TABLE_CLAUSES:
      clause[depth] = "FROM"
      table_next = True
      continue
    if kind == duckdb.token_type.keyword and upper in _OTHER_CLAUSES:
      clause[depth] = upper
    if text == "," and clause.get(depth) == "FROM":
      table_next = True
      continue
    if kind in _IDENTIFIERS and following == "(":
      allowed = TABLE_FUNCTIONS if at_table else (names.functions |
                                                  TABLE_FUNCTIONS)
      if name in names.known and name not in allowed:
        _refuse_function(name)
      continue
    if not at_table:
      continue
    if kind == duckdb.token_type.string_const or (
        kind in _IDENTIFIERS and (following == "." or
                                  re.search(r"[./\\:]", name) or
                                  name in names.system_tables)):
      raise QueryError(f"{text} is not a view of this folder: a query may "
                       f"read {', '.join(sorted(views))}, nothing else")


def _check_calls(sql: str) -> None:
  """Every name called, `name(`, that is a known function is an allowed one."""
  names = catalog()
  tokens = _tokens(sql)
  for (_, kind, text), (_, _, following) in zip(tokens, tokens[1:]):
    name = _unquoted(text).lower()
    if (kind in _IDENTIFIERS and following == "(" and name in names.known and
        name not in names.functions and name not in TABLE_FUNCTIONS):
      _refuse_function(name)


def check_read_only(sql: str, views: Iterable[str] = DEFAULT_VIEWS) -> None:
  """Refuses, in one line, anything but one query or EXPLAIN of a query
  that reads the `views` and calls only allowed functions."""
  if len(sql) > MAX_STATEMENT_CHARACTERS:
    raise QueryError(f"the statement is longer than "
                     f"{MAX_STATEMENT_CHARACTERS} characters")
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
  views = {view.lower() for view in views}
  query = _explained(sql) if kind.startswith("EXPLAIN ") else sql
  statements = _parse(query)
  if statements is None:
    _check_tokens(query, views)
  else:
    _check_tree(statements, views)
    # The tree leaves out what DuckDB never evaluates (a WINDOW no
    # expression uses); no call to a refused function is let through in
    # such a place either.
    _check_calls(query)
