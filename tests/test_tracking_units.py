"""pipeline/tracking.py's decisions, in milliseconds: which store fault a user can fix (and how), from
the errors MLflow, SQLAlchemy, SQLite and requests really raise; which file is an MLflow store; which
login a server refuses; when a run is tagged dirty. An MLflow or SQLAlchemy upgrade that rewords an
error fails here, not after the end-to-end suite (tests/test_store_faults.py) or in a user's terminal."""

import http.server
import sqlite3
import subprocess
import threading

import pytest

from pipeline.errors import PipelineError
from tests.helpers import QuietHandler

URI = "sqlite:////somewhere/mlflow.db"


def raised(action) -> Exception:
    """The exception `action()` raises."""
    with pytest.raises(Exception) as caught:
        action()
    return caught.value


def describe(error: Exception, uri: str = URI) -> str | None:
    from pipeline.tracking import describe_store_fault

    return describe_store_fault(error, uri)


# SQLite stores: the errors as MLflow's SQLAlchemy store raises them.


@pytest.fixture
def store_session(tmp_path):
    """(database, session()): MLflow's own managed SQLAlchemy session over a SQLite file, the one its
    store runs every query in (it turns SQLAlchemy's errors into MlflowException)."""
    import sqlalchemy
    from mlflow.store.db.utils import _get_managed_session_maker

    database = tmp_path / "mlflow.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE experiments (name TEXT)")
    engine = sqlalchemy.create_engine(f"sqlite:///{database}")
    yield database, _get_managed_session_maker(sqlalchemy.orm.sessionmaker(bind=engine), "sqlite")
    engine.dispose()


def write_in(session_maker, *pragmas: str) -> None:
    import sqlalchemy

    with session_maker(read_only=False) as session:
        for pragma in pragmas:
            session.execute(sqlalchemy.text(pragma))
        session.execute(sqlalchemy.text("INSERT INTO experiments VALUES ('mnist')"))


def test_a_store_locked_by_another_writer(store_session):
    database, session = store_session
    writer = sqlite3.connect(database, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        # MLflow's session waits up to 20 s for the lock; 50 ms is enough to get the same error.
        error = raised(lambda: write_in(session, "PRAGMA busy_timeout = 50"))
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    line = describe(error)
    assert line and URI in line and "locked" in line


def test_a_read_only_store(store_session):
    _, session = store_session
    error = raised(lambda: write_in(session, "PRAGMA query_only = 1"))  # SQLite's SQLITE_READONLY
    line = describe(error)
    assert line and URI in line and "read-only" in line and "writable" in line


def unopenable_as_something_else(line: str) -> bool:
    """A store that cannot be opened told as another fault (whose fix would not help)."""
    return any(fault in line for fault in ("locked", "read-only", "tracking server", "older MLflow", "newer MLflow"))


def test_a_file_that_is_not_a_database(tmp_path):
    import mlflow

    text = tmp_path / "notes.db"
    text.write_text("not a database\n" * 100)
    line = describe(raised(lambda: mlflow.MlflowClient(f"sqlite:///{text}").search_experiments()))
    assert line and URI in line and not unopenable_as_something_else(line)


def test_a_folder_where_the_store_should_be(tmp_path):
    import sqlalchemy

    # What MLflow's engine creation raises in the end (after its own retries) for a folder.
    error = raised(lambda: sqlalchemy.create_engine(f"sqlite:///{tmp_path}").connect())
    line = describe(error)
    assert line and URI in line and not unopenable_as_something_else(line)


@pytest.mark.parametrize(
    "revision, made_by, fix",
    [
        ("0a8213491aaa", "an older MLflow", f"mlflow db upgrade {URI}"),  # one of MLflow's own migrations
        ("ffffffffffff", "a newer MLflow", "requirements.lock"),  # a revision this MLflow does not know
    ],
    ids=["older", "newer"],
)
def test_a_store_of_another_mlflow_version(tmp_path, revision, made_by, fix):
    import sqlalchemy
    from mlflow.store.db.utils import _verify_schema  # what MLflow's SQLAlchemy store runs when it opens

    database = tmp_path / "mlflow.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        connection.execute("INSERT INTO alembic_version VALUES (?)", (revision,))
    line = describe(raised(lambda: _verify_schema(sqlalchemy.create_engine(f"sqlite:///{database}"))))
    assert line and made_by in line and fix in line


# Tracking servers: MLflow's REST client and artifact client against answers as MLflow's auth app gives them.


@pytest.fixture(scope="module")
def answering():
    """answering(status) -> a URL on 127.0.0.1 under which every request gets MLflow's basic-auth
    app's answer: no login (401) or no permission (403)."""
    import warnings

    import flask

    with warnings.catch_warnings():  # MLflow's server imports a deprecated part of Starlette
        warnings.simplefilter("ignore")
        from mlflow.server.auth import make_basic_auth_response, make_forbidden_response

    with flask.Flask(__name__).app_context():
        responses = [make_basic_auth_response(), make_forbidden_response()]
    answers = {response.status_code: (response.get_data(), dict(response.headers)) for response in responses}

    class Answer(QuietHandler):
        def do_GET(self):
            status = int(self.path.split("/")[1])  # the URL's first segment chooses the answer
            body, headers = answers[status]
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_PUT = do_GET

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield lambda status: f"http://127.0.0.1:{server.server_address[1]}/{status}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def no_retries(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def rest_call(url: str) -> Exception:
    import mlflow

    return raised(lambda: mlflow.MlflowClient(url).search_experiments())


def artifact_upload(url: str, tmp_path) -> Exception:
    from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

    file = tmp_path / "metrics.json"
    file.write_text("{}")
    repository = HttpArtifactRepository(f"{url}/api/2.0/mlflow-artifacts/artifacts/1/0123/artifacts")
    return raised(lambda: repository.log_artifact(str(file)))


@pytest.mark.parametrize("call", [rest_call, artifact_upload], ids=["rest", "artifacts"])
def test_a_server_that_denies_the_permission(answering, no_retries, monkeypatch, tmp_path, call):
    url = answering(403)
    arguments = (url, tmp_path) if call is artifact_upload else (url,)
    anonymous = describe(call(*arguments), url)
    assert anonymous and url in anonymous and "403" in anonymous
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    logged_in = describe(call(*arguments), url)
    assert logged_in and "403" in logged_in and "MLFLOW_TRACKING_USERNAME=alice" in logged_in
    assert logged_in != anonymous  # a user who lacks the permission is told to ask for it


@pytest.mark.parametrize("call", [rest_call, artifact_upload], ids=["rest", "artifacts"])
def test_a_server_that_wants_a_login(answering, no_retries, tmp_path, call):
    url = answering(401)
    line = describe(call(*((url, tmp_path) if call is artifact_upload else (url,))), url)
    assert line and url in line and "401" in line


def test_a_server_that_stopped_answering(no_retries):
    from tests.helpers import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    line = describe(rest_call(url), url)
    assert line and url in line and "dvc repro" in line


def test_other_mlflow_errors_are_not_store_faults(no_retries):
    """MLflow's refusal of a malformed run id is a bug of the caller: it keeps its traceback."""
    import mlflow

    assert describe(raised(lambda: mlflow.MlflowClient("http://127.0.0.1:9").get_run("not a run id"))) is None
    assert describe(raised(lambda: {}["run_id"])) is None


def test_store_faults_turns_only_store_faults_into_one_line(store_session):
    from pipeline.tracking import store_faults

    _, session = store_session
    with pytest.raises(PipelineError, match="read-only"), store_faults():
        write_in(session, "PRAGMA query_only = 1")
    with pytest.raises(PipelineError, match="^as it was$"), store_faults():
        raise PipelineError("as it was")
    with pytest.raises(KeyError), store_faults():  # a bug keeps its exception and traceback
        {}["run_id"]


# What connect() checks before MLflow touches a store.


@pytest.mark.parametrize(
    "make, refused",
    [
        (lambda path: None, None),  # absent: MLflow creates it
        (lambda path: path.touch(), None),  # empty: likewise
        (lambda path: path.mkdir(), "a folder"),  # refused at once: MLflow would retry for minutes
        (lambda path: sqlite3.connect(path).execute("CREATE TABLE experiments (id INTEGER)"), None),
        (lambda path: path.write_text("not a database\n" * 100), "not an MLflow store"),
        (lambda path: sqlite3.connect(path).execute("CREATE TABLE invoices (id INTEGER)"), "invoices"),
    ],
    ids=["absent", "empty", "folder", "mlflow-store", "text", "other-sqlite"],
)
def test_only_an_mlflow_store_or_nothing_is_opened(tmp_path, make, refused):
    from pipeline.tracking import check_sqlite_store

    path = tmp_path / "mlflow.db"
    make(path)
    if refused is None:
        check_sqlite_store(path, f"sqlite:///{path}")
        return
    with pytest.raises(PipelineError) as error:
        check_sqlite_store(path, f"sqlite:///{path}")
    # The file, what it is (another database's tables are named) and the variable that points elsewhere.
    assert str(path) in str(error.value) and refused in str(error.value) and "MLFLOW_TRACKING_URI" in str(error.value)


def test_a_login_is_checked_before_any_work(answering, no_retries, monkeypatch):
    from pipeline.tracking import check_login

    url = answering(401)
    with pytest.raises(PipelineError, match="MLFLOW_TRACKING_USERNAME") as anonymous:
        check_login(url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(PipelineError, match="alice") as rejected:
        check_login(url)
    assert str(anonymous.value) != str(rejected.value)  # no login vs a wrong one
    check_login(answering(403))  # logged in, lacking a permission: for the request that meets it


# When a run is tagged dirty: what `make reproduce RUN=` can rebuild.


@pytest.fixture
def repository(tmp_path, monkeypatch):
    """A git repository holding the files a result depends on, as the working directory."""
    for name in ("DVC_EXP_BASELINE_REV", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    for path in ("pipeline/train.py", "conf/config.yaml", "dvc.yaml", "requirements.lock", "params.yaml"):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text("# committed\n")
    monkeypatch.chdir(tmp_path)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "results' inputs"], check=True)
    return tmp_path


def test_a_run_is_clean_only_when_its_commit_holds_its_inputs(repository):
    from pipeline.tracking import git, lineage_tags

    head = git("rev-parse", "HEAD")
    assert lineage_tags()["git.commit"] == head and lineage_tags()["git.dirty"] == "false"
    (repository / "params.yaml").write_text("train: {epochs: 7}\n")  # DVC writes it during runs
    assert lineage_tags()["git.dirty"] == "false"
    (repository / "pipeline/train.py").write_text("# edited\n")
    assert lineage_tags()["git.dirty"] == "true"
    subprocess.run(["git", "checkout", "-q", "pipeline/train.py"], check=True)
    (repository / "conf/new.yaml").write_text("{}\n")  # an untracked preset changes a result too
    assert lineage_tags()["git.dirty"] == "true"


def test_an_experiment_is_tagged_with_its_baseline(repository, monkeypatch):
    from pipeline.tracking import lineage_tags

    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123abcd")
    monkeypatch.setenv("DVC_EXP_NAME", "lr_x10-seed0")
    tags = lineage_tags()
    assert tags["git.commit"] == "0123abcd" and tags["dvc.baseline_rev"] == "0123abcd"
    assert tags["dvc.exp_name"] == "lr_x10-seed0"


def test_outside_a_repository_a_run_is_dirty(tmp_path, monkeypatch):
    from pipeline.tracking import lineage_tags

    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.chdir(tmp_path)
    tags = lineage_tags()
    assert tags["git.commit"] == "unknown" and tags["git.dirty"] == "true"
