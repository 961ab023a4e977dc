"""`tools.query sql` is read-only: every known way out is refused twice.

Each hostile statement is refused by the statement checks (`run_sql`), and,
run straight on the locked DuckDB connection as if those checks were not
there, it reads no file but the listed shards and changes no file at all.
The statements are those a security review found, plus the file functions,
COPY, ATTACH, INSTALL, LOAD, SET and PRAGMA forms and the EXPLAIN ANALYZE
and WITH wrappers that hide them.
"""

import dataclasses
import hashlib
import os
import subprocess
import sys
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# Without the tools extra these tests skip.
duckdb = pytest.importorskip("duckdb")
# pylint: disable=wrong-import-position

from beam_jobs import outputs
from tools import query
from tools import sandbox
from tools import sql_checks
from tests.helpers import REPO

SECRET = "TOP-SECRET-0d9a1c"
RUN = "20240101T000000-abc123"
CLASSES = ["cat", "dog", "owl"]
SCHEME = sandbox.SHARDS_PROTOCOL
# A path outside every folder of the test, which no statement may create.
PROBE = f"/tmp/sql-boundary-probe-{uuid.uuid4().hex}"


@dataclasses.dataclass
class Boundary:
  root: str
  out: str
  shard: str  # the name of a listed predictions shard
  rows: int


def _shard_name(kind: str, index: int, count: int) -> str:
  return f"{kind}-{RUN}-{index:05d}-of-{count:05d}.parquet"


def _predictions(ids: list) -> pa.Table:
  rng = np.random.default_rng(len(ids))
  probabilities = rng.random((len(ids), 3)).astype(np.float32)
  probabilities /= probabilities.sum(1, keepdims=True)
  return outputs.predictions_table(ids, ["src"] * len(ids),
                                   [CLASSES[i % 3] for i in range(len(ids))],
                                   probabilities, CLASSES, 2, "m", "keras",
                                   False)


@pytest.fixture(scope="module")
def boundary(tmp_path_factory):
  root = tmp_path_factory.mktemp("boundary")
  (root / "secret.txt").write_text(SECRET + "\n")
  (root / "private").mkdir()
  (root / "private" / "secret2.txt").write_text(SECRET + "\n")
  (root / "out_evil").mkdir()
  pq.write_table(pa.table({"id": [SECRET]}), root / "out_evil" / "x.parquet")
  out = root / "out"
  out.mkdir()
  files = {"predictions": [], "errors": []}
  for index in range(2):
    name = _shard_name("predictions", index, 2)
    pq.write_table(_predictions([f"img{index}_{i}" for i in range(50)]),
                   out / name)
    files["predictions"].append({"name": name, "rows": 50})
  errors = _shard_name("errors", 0, 1)
  pq.write_table(pa.Table.from_pylist(
      [{"id": "bad", "source": "s", "stage": "decode", "error": "E: x"}],
      schema=outputs.ERRORS_SCHEMA), out / errors)
  files["errors"].append({"name": errors, "rows": 1})
  outputs.write_manifest(str(out), {"run_id": RUN, "model_id": "m",
                                    "files": files})
  # Not listed: a shard planted beside the real ones, and links out.
  pq.write_table(_predictions([SECRET]),
                 out / "predictions-20990101T000000-ffffff-00000-of-00001.parquet")
  os.symlink(root / "secret.txt", out / "passwd_link")
  os.symlink(root / "private", out / "etc_link")
  return Boundary(str(root), str(out), files["predictions"][0]["name"], 100)


def _snapshot(root: str) -> dict:
  """Every entry under root: kind, size and content hash; links unfollowed."""
  entries = {}
  for folder, folders, names in os.walk(root):
    for name in folders + names:
      path = os.path.join(folder, name)
      info = os.lstat(path)
      digest = None
      if os.path.isfile(path) and not os.path.islink(path):
        with open(path, "rb") as handle:
          digest = hashlib.sha256(handle.read()).hexdigest()
      entries[os.path.relpath(path, root)] = (info.st_mode, info.st_size,
                                              digest)
  return entries


HOSTILE = [
    # The issue's own findings.
    "EXPLAIN ANALYZE COPY (SELECT * FROM predictions) TO '{out}/{shard}'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{root}/x.csv'",
    "EXPLAIN ANALYZE INSTALL httpfs",
    "SELECT * FROM read_text('{root}/secret.txt')",
    "SELECT * FROM read_text('/etc/passwd')",
    # Writing files, in every wrapper.
    "COPY (SELECT 1) TO '{root}/x.csv'",
    "COPY (SELECT 1) TO '" + PROBE + "'",
    "COPY (SELECT 'x' AS id) TO '{out}/predictions-evil.parquet'",
    "COPY predictions TO '{out}/{shard}'",
    "COPY (SELECT 1 AS a) TO '{out}/{shard}' (USE_TMP_FILE false)",
    "COPY (SELECT 1) TO '" + SCHEME + "://x.csv'",
    "COPY (SELECT 1 AS a) TO '" + SCHEME + "://{shard}'",
    "COPY (SELECT 1 AS a) TO '" + SCHEME + "://{shard}' (USE_TMP_FILE false)",
    "COPY predictions FROM '{root}/secret.txt'",
    "WITH x AS (COPY (SELECT 'x' AS id) TO '{out}/predictions-cte.parquet') "
    "SELECT 1",
    "WITH x AS (COPY (SELECT 1) TO '" + SCHEME + "://y.parquet') SELECT 1",
    "EXPLAIN (ANALYZE) COPY (SELECT 1) TO '{root}/z.csv'",
    "/* c */ EXPLAIN /* c */ ANALYZE /* c */ COPY (SELECT 1) TO '{root}/z.csv'",
    "SELECT 1; COPY (SELECT 1) TO '{root}/x.csv'",
    "EXPORT DATABASE '{root}/exported'",
    "EXPORT DATABASE '" + SCHEME + "://exported'",
    "SELECT * FROM query('COPY (SELECT 1) TO ''{root}/q.csv''')",
    # Databases.
    "ATTACH '{root}/x.db'",
    "ATTACH '{out}/x.db'",
    "ATTACH '" + SCHEME + "://x.db'",
    "ATTACH ':memory:' AS m2",
    "DETACH memory",
    "SELECT * FROM read_duckdb('{root}/x.db')",
    # Extensions.
    "INSTALL httpfs",
    "FORCE INSTALL httpfs",
    "LOAD httpfs",
    "LOAD '{root}/evil.duckdb_extension'",
    "UPDATE EXTENSIONS",
    "CREATE EXTENSION REPOSITORY example.com",
    "SELECT * FROM read_parquet('https://example.com/x.parquet')",
    "SELECT * FROM read_parquet('s3://bucket/x.parquet')",
    # Reading files other than the listed shards.
    "SELECT * FROM read_text('{out}/passwd_link')",
    "SELECT * FROM read_text('{out}/etc_link/secret2.txt')",
    "SELECT * FROM read_text('{out}/../secret.txt')",
    "SELECT * FROM read_text('{out}//../secret.txt')",
    "SELECT * FROM read_text('file://{root}/secret.txt')",
    "SELECT * FROM read_blob('{root}/secret.txt')",
    "SELECT * FROM read_csv('{root}/secret.txt')",
    "SELECT * FROM read_json('{root}/secret.txt')",
    "SELECT * FROM sniff_csv('{root}/secret.txt')",
    "SELECT * FROM read_parquet('{root}/out_evil/x.parquet')",
    "SELECT * FROM read_parquet('{out}/../out_evil/x.parquet')",
    "SELECT * FROM read_parquet('{out}/predictions-*.parquet')",
    "SELECT * FROM parquet_metadata('{root}/out_evil/x.parquet')",
    "SELECT * FROM '{root}/out_evil/x.parquet'",
    "SELECT * FROM glob('{root}/*')",
    "SELECT * FROM glob('{out}/**')",
    "SELECT * FROM read_text('" + SCHEME + "://../secret.txt')",
    "SELECT * FROM read_text('" + SCHEME + "://passwd_link')",
    "SELECT * FROM read_parquet('" + SCHEME + "://../out_evil/x.parquet')",
    "SELECT * FROM query('SELECT * FROM read_text(''{root}/secret.txt'')')",
    # Settings, secrets and the catalog.
    "SET enable_external_access = true",
    "RESET enable_external_access",
    "SET allowed_directories = ['/']",
    "SET lock_configuration = false",
    "SET temp_directory = '{root}'",
    "SET threads = 1",
    "SET VARIABLE v = 1",
    "USE memory",
    "PRAGMA enable_profiling",
    "PRAGMA version",
    "CALL duckdb_settings()",
    "CHECKPOINT",
    "VACUUM",
    "CREATE SECRET (TYPE s3, KEY_ID 'a', SECRET 'b')",
    "CREATE PERSISTENT SECRET ps (TYPE s3, KEY_ID 'a', SECRET 'b')",
    "SELECT * FROM duckdb_secrets()",
    "CREATE TABLE t AS SELECT 1 AS a",
    "CREATE OR REPLACE VIEW predictions AS SELECT 1",
    "DROP VIEW predictions",
    "ALTER VIEW predictions RENAME TO p2",
    "CREATE MACRO m(x) AS x + 1",
    "INSERT INTO t VALUES (2)",
    "UPDATE t SET a = 1",
    "DELETE FROM t",
    "MERGE INTO t USING (SELECT 1 a) s ON t.a = s.a "
    "WHEN NOT MATCHED THEN INSERT VALUES (1)",
    "WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x",
    "BEGIN TRANSACTION",
    "PREPARE p AS SELECT 1",
    "",
    "SELECT 1; SELECT 2",
    # The deny-list's bypasses (issue 26): functions it had no name for.
    "SELECT * FROM json_execute_serialized_sql(json_serialize_sql("
    "'SELECT * FROM read_text(''{root}/secret.txt'')'))",
    "SELECT * FROM destroy_external_resource('x')",
    "SELECT json_serialize_plan('SELECT * FROM read_text(''{root}/secret.txt'')')",
    # Names however spelt: quoted, upper-case, qualified, as a method.
    "SELECT * FROM \"read_text\"('{root}/secret.txt')",
    "SELECT * FROM \"READ_TEXT\"('{root}/secret.txt')",
    "SELECT * FROM main.read_text('{root}/secret.txt')",
    "SELECT * FROM system.main.read_text('{root}/secret.txt')",
    "SELECT * FROM \"system\".\"main\".\"read_blob\"('{root}/secret.txt')",
    "SELECT '{root}/secret.txt'.read_text()",
    "SELECT * FROM \"{root}/secret.txt\"",
    "SELECT * FROM predictions, '{root}/secret.txt'",
    "SELECT * FROM secret.txt",
    "SUMMARIZE '{root}/secret.txt'",
    "DESCRIBE SELECT * FROM read_text('{root}/secret.txt')",
    "TABLE \"{root}/secret.txt\"",
    # Settings, variables and the catalog, read from a query.
    "SELECT getvariable('v')",
    "SELECT current_setting('allowed_directories')",
    "SELECT * FROM duckdb_settings()",
    "SELECT * FROM pg_settings",
    "SELECT * FROM pg_catalog.pg_settings",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM duckdb_logs",
    "SELECT * FROM memory.main.predictions",
    "SELECT write_log('x')",
    "SELECT setseed(0.5)",
    "SELECT sleep_ms(1)",
    "SELECT * FROM query_table('predictions')",
    # Inside lambdas, subqueries, windows and the ORDER BY of a query.
    "SELECT list_transform([1], x -> getvariable('v'))",
    "SELECT list_transform([1], lambda x: current_setting('threads'))",
    "SELECT invoke(lambda x: current_setting('threads'), 1)",
    "SELECT (SELECT content FROM read_text('{root}/secret.txt'))",
    "SELECT count(*) OVER (ORDER BY getvariable('v')) FROM predictions",
    "SELECT * FROM predictions LIMIT (SELECT count(*) FROM duckdb_settings())",
    "FROM range(3) t, LATERAL read_text('{root}/secret.txt')",
    "SELECT 1 FROM predictions WINDOW w AS (ORDER BY getvariable('v'))",
    # PIVOT without an IN list has no parse tree: its tokens are checked.
    "PIVOT (FROM read_text('{root}/secret.txt')) ON content USING count(*)",
    "PIVOT predictions ON label IN (SELECT content FROM "
    "read_text('{root}/secret.txt')) USING count(*)",
    "PIVOT '{root}/secret.txt' ON column0 USING count(*)",
    "PIVOT \"{root}/secret.txt\" ON column0 USING count(*)",
    "PIVOT pg_settings ON name USING count(*)",
    "PIVOT (FROM predictions, '{root}/secret.txt') ON label USING count(*)",
    "PIVOT_WIDER (FROM \"read_text\"('{root}/secret.txt')) ON content",
    "PIVOT predictions ON label USING count(*) "
    "ORDER BY (SELECT 1 FROM duckdb_settings() LIMIT 1)",
    "UNPIVOT (FROM read_text('{root}/secret.txt')) ON COLUMNS(*) "
    "INTO NAME n VALUE v",
]

READ_ONLY = [
    "SELECT count(*) AS n FROM predictions",
    "FROM predictions SELECT label LIMIT 1",
    "WITH x AS (SELECT label FROM predictions) SELECT count(*) FROM x",
    "SUMMARIZE predictions",
    "DESCRIBE predictions",
    "SHOW TABLES",
    "PIVOT predictions ON label USING count(*)",
    "PIVOT predictions ON label IN ('cat', 'dog') USING count(*)",
    "EXPLAIN SELECT * FROM predictions",
    "EXPLAIN ANALYZE SELECT count(*) FROM predictions",
    "explain (format json) select 1",
    "SELECT stage, count(*) FROM errors GROUP BY ALL",
    "SELECT count(*) FROM errors WHERE error NOT LIKE '%COPY%'",
    "  -- a comment\n SELECT 1",
    "VALUES (1), (2)",
    "SELECT 'read_text(x)' AS looks_like_a_call, 1 AS \"copy\"",
    # What queries over the views use: lambdas, lists, windows, CTEs.
    "SELECT list_transform(top_k, lambda x: x.confidence) FROM predictions",
    "SELECT t.x FROM predictions, unnest(top_k) AS t(x)",
    "SELECT unnest(top_k) FROM predictions",
    "SELECT * FROM range(3)",
    "SELECT * FROM generate_series(1, 3)",
    "SELECT label, count(*) FILTER (WHERE confidence > 0.5), "
    "quantile_cont(confidence, 0.5), histogram(label) FROM predictions "
    "GROUP BY ALL",
    "SELECT id, row_number() OVER (PARTITION BY label ORDER BY confidence) "
    "FROM predictions QUALIFY row_number() OVER (PARTITION BY label "
    "ORDER BY confidence DESC) = 1",
    "SELECT coalesce(true_label, '?'), grouping(label) FROM predictions "
    "GROUP BY ROLLUP (label, true_label)",
    "SELECT COLUMNS('.*label') FROM predictions",
    "SELECT * EXCLUDE (top_k) REPLACE (upper(label) AS label) FROM predictions",
    "SELECT id.upper(), regexp_split_to_table(id, '_'), now(), current_date "
    "FROM predictions",
    "SELECT count(*) FROM predictions p JOIN errors e USING (id)",
    "SELECT count(*) FROM predictions WHERE id IN (SELECT id FROM errors)",
    "SELECT CAST(confidence AS DECIMAL(10, 2)), TRY_CAST(id AS INT), "
    "extract(year FROM now()), id SIMILAR TO 'x', id ILIKE '%a' "
    "FROM predictions",
    "SELECT {'a': 1}, [1, 2][1], map([1], [2]), struct_pack(a := 1)",
    "FROM predictions UNPIVOT (v FOR k IN (label, id))",
    "UNPIVOT predictions ON label, id INTO NAME k VALUE v",
    "PIVOT predictions ON label USING avg(confidence) GROUP BY true_label",
    "PIVOT predictions ON label IN (SELECT DISTINCT label FROM predictions) "
    "USING count(*)",
    "TABLE predictions",
    "SHOW predictions",
    "SELECT count(*) FROM predictions USING SAMPLE 10%",
    "SELECT approx_count_distinct(id), string_agg(id, ','), "
    "list(id ORDER BY id) FROM predictions",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_statement_is_refused_and_the_lock_holds(boundary, template):
  statement = template.format(root=boundary.root, out=boundary.out,
                              shard=boundary.shard)
  views = sandbox.connect(boundary.out)
  with pytest.raises(sandbox.QueryError):
    sandbox.run_sql(views, statement)
  # Past the statement checks, straight on the locked connection.
  before = _snapshot(boundary.root)
  try:
    cursor = views.connection.execute(statement)
    result = repr(cursor.fetchall() if cursor else None)
  except (duckdb.Error, PermissionError, ValueError, RuntimeError) as error:
    result = str(error)
  assert _snapshot(boundary.root) == before
  assert SECRET not in result and "root:x:0:0" not in result
  assert not os.path.exists(PROBE)


@pytest.mark.parametrize("template", HOSTILE)
def test_the_second_layer_alone_refuses_every_hostile_statement(boundary,
                                                                 template):
  """The statement checks refuse each statement before DuckDB runs it, not
  the locked connection. Fails on the deny-list before the allow-list
  (json_execute_serialized_sql, destroy_external_resource, getvariable,
  current_setting, pg_settings, ... passed it)."""
  statement = template.format(root=boundary.root, out=boundary.out,
                              shard=boundary.shard)
  with pytest.raises(sql_checks.QueryError):
    sql_checks.check_read_only(statement)


@pytest.mark.parametrize("statement", READ_ONLY)
def test_read_only_statements_run(boundary, statement):
  views = sandbox.connect(boundary.out)
  assert sandbox.run_sql(views, statement)


def test_the_views_hold_exactly_the_listed_shards(boundary):
  views = sandbox.connect(boundary.out)
  # The planted, unlisted shard holds SECRET; the listed ones 100 rows.
  assert sandbox.scalar(views, "SELECT count(*) FROM predictions") == 100
  assert not sandbox.rows(views, "SELECT id FROM predictions WHERE id = ?",
                        [SECRET])
  # Even past the statement checks, the scheme lists the listed shards.
  names = sorted(row[0] for row in views.connection.execute(
      f"SELECT file FROM glob('{SCHEME}://*')").fetchall())
  assert [name.rsplit("/", 1)[-1] for name in names] == sorted(
      views._shards)  # pylint: disable=protected-access
  assert sorted(os.path.basename(path) for path, _ in
                views._shards.values()) == sorted(  # pylint: disable=protected-access
                    [_shard_name("predictions", i, 2) for i in range(2)] +
                    [_shard_name("errors", 0, 1)])


def test_a_long_query_is_stopped_at_the_time_limit(boundary):
  views = sandbox.connect(boundary.out, timeout_seconds=0.5)
  with pytest.raises(sandbox.QueryError, match="--timeout"):
    sandbox.run_sql(views, "SELECT sum(a.range * b.range) FROM range(200000) a, "
                  "range(200000) b")


def test_results_are_capped_at_max_rows(boundary, capsys):
  views = sandbox.connect(boundary.out)
  result = sandbox.run_sql(views, "SELECT * FROM range(50)", max_rows=10)
  assert len(result) == 10
  assert "first 10 rows" in capsys.readouterr().err


def test_the_cli_refuses_in_one_line(boundary, capsys):
  code = query.main([boundary.out, "sql",
                     f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{boundary.root}/x'"])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and "read-only" in err
  assert not os.path.exists(os.path.join(boundary.root, "x"))


def test_remote_shards_are_read_through_their_file_system(tmp_path):
  """gs:// shards reach DuckDB through fsspec (gcsfs); fsspec's in-memory
  file system stands in for it here, offline."""
  import fsspec  # pylint: disable=import-outside-toplevel
  memory = fsspec.filesystem("memory")
  with memory.open("memory://bucket/out/shard.parquet", "wb") as handle:
    pq.write_table(_predictions([f"r{i}" for i in range(5000)]), handle)
  shards = sandbox.ListedShards(
      {"shard.parquet": ("memory://bucket/out/shard.parquet", memory)})
  connection = duckdb.connect()
  connection.register_filesystem(shards)
  rows = connection.execute(
      f"SELECT count(*), count(DISTINCT id) FROM "
      f"read_parquet('{SCHEME}://shard.parquet')").fetchall()
  assert rows == [(5000, 5000)]
  with pytest.raises(PermissionError):
    shards.open(f"{SCHEME}://shard.parquet", "wb")
  with pytest.raises(FileNotFoundError):
    shards.open(f"{SCHEME}://other.parquet", "rb")


# A result file's name is data from a shared folder; these names try to end
# the quoted path in the views' SQL and run a statement of their own.
INJECTED_NAMES = [
    "predictions-X.parquet'], union_by_name=true); COPY (SELECT 'echo pwned' "
    "AS x) TO 'pwned.txt' (HEADER false, QUOTE ''); --.parquet",
    "predictions-X.parquet']); COPY (SELECT 1) TO 'pwned.txt'; --.parquet",
    "predictions-\"); COPY (SELECT 1) TO 'pwned.txt'; --.parquet",
    "predictions-x'') ; ATTACH 'pwned.txt' AS p; --.parquet",
    "predictions-x\\'; COPY (SELECT 1) TO 'pwned.txt'; --.parquet",
    "predictions-x'\n; COPY (SELECT 1) TO 'pwned.txt';\n--.parquet",
    "predictions-x$$; COPY (SELECT 1) TO 'pwned.txt'; --$$.parquet",
]


@pytest.mark.parametrize("listed", [True, False], ids=["manifest", "no_manifest"])
@pytest.mark.parametrize("name", INJECTED_NAMES)
def test_a_shard_name_never_becomes_sql(tmp_path, monkeypatch, capsys, name,
                                        listed):
  """Fails on the code before the fix: the name was pasted into
  read_parquet([...]) before the connection was locked."""
  out = tmp_path / "out"
  out.mkdir()
  # The shard the injected SQL names first, so that its statement parses.
  decoy = "predictions-X.parquet"
  pq.write_table(_predictions(["d"]), out / decoy)
  pq.write_table(_predictions(["a", "b", "c"]), out / name)
  if listed:
    outputs.write_manifest(str(out), {
        "run_id": RUN, "model_id": "m",
        "files": {"predictions": [{"name": decoy, "rows": 1},
                                  {"name": name, "rows": 3}],
                  "errors": []}})
  work = tmp_path / "work"
  work.mkdir()
  monkeypatch.chdir(work)
  before = _snapshot(str(tmp_path))
  assert query.main([str(out), "--json"]) == 0
  # A backslash is in no shard name of ours: the manifest's filter and
  # Beam's glob leave such a file out, so only the decoy is read.
  expected = 1 if "\\" in name else 4
  assert f'"predictions": {expected}' in capsys.readouterr().out
  assert _snapshot(str(tmp_path)) == before
  assert not os.listdir(work)


@pytest.mark.slow
@pytest.mark.parametrize("statement", [
    # One value built outside DuckDB's buffers: only the process cap holds.
    "SELECT length(repeat('x', 2000000000)) AS n",
    # A hash table inside them: DuckDB's memory_limit holds.
    "SELECT count(DISTINCT range) AS n FROM range(150000000)",
])
def test_a_query_runs_in_bounded_memory(boundary, tmp_path, statement):
  """Fails on the code before the fix: there was no memory limit, and each
  statement ran to its end (2 GB and more)."""
  out, err, usage = (tmp_path / name for name in ("stdout", "stderr", "usage"))
  with open(out, "wb") as stdout, open(err, "wb") as stderr:
    # A child's ru_maxrss starts from the memory of the process it was
    # forked from (this pytest holds gigabytes), so a small interpreter
    # starts the command and reports the command's own peak.
    returncode = subprocess.call(
        [sys.executable, "-c", _PEAK_OF_CHILD, str(usage), sys.executable,
         "-m", "tools.query", boundary.out, "--memory_limit", "256MB",
         "--timeout", "120", "sql", statement],
        stdout=stdout, stderr=stderr, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO))
  message = err.read_text()
  assert returncode in (1, 2), (message, out.read_text())
  assert message.count("\n") == 1 and "--memory_limit" in message, message
  # ru_maxrss is in KiB: the command stayed within the limit and its 1 GB
  # of headroom, far below what the query asked.
  peak_kib = int(usage.read_text())
  assert 0 < peak_kib * 1024 < 2e9, peak_kib


_PEAK_OF_CHILD = """
import os, subprocess, sys
process = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(process.pid, 0)
with open(sys.argv[1], "w") as handle:
  handle.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("flags", [
    ["--timeout", "0"], ["--timeout", "-1"], ["--timeout", "nan"],
    ["--timeout", "inf"], ["--timeout", "soon"], ["--memory_limit", "0"],
    ["--memory_limit", "-1GB"], ["--memory_limit", "4"],
    ["--memory_limit", "lots"], ["--memory_limit", "1KB"],
    ["sql", "SELECT 1", "--max_rows", "-2"], ["sql", "SELECT 1", "--max_rows",
                                              "0"],
    ["errors", "--limit", "0"], ["errors", "--limit", "1.5"],
    ["low-confidence", "--below", "nan"], ["low-confidence", "--below", "inf"],
])
def test_every_limit_flag_is_checked_in_one_line(boundary, capsys, flags):
  """Fails on the code before the fix: --timeout 0, -1, nan and inf turned
  the limit off, --max_rows -2 gave a traceback, and --memory_limit did not
  exist."""
  with pytest.raises(SystemExit) as exit_:
    query.main([boundary.out] + flags)
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.count("\n") == 1, err
  assert flags[-2] in err, err
