"""`make server`'s logins and the rules MLflow's basic-auth app leaves open, as that app's
`authorization_function` (https://mlflow.org/docs/latest/self-hosting/security/custom):
MLflow calls it first on every request, admins' included, on its Flask routes and on the artifact
routes it serves with FastAPI, and answers with the response it returns instead of going on.

- A login costs one password hash whether the user exists or not: the time of a refusal does not
  tell which user names exist. MLflow's own check hashes only for users that exist.
- LOCK_AFTER failed logins in a row lock the user name (existing or not, alike) for 1 s, then 2, 4, ...
  up to LONGEST_LOCK, refused with 429 without looking at the password; a login that succeeds ends it.
- Authorization other than Basic gets 401 (MLflow's check answers 500 to `Digest ...`).
- Only admins list users (MLflow lets every user see every name and who is admin).
- Artifacts stay where the server puts them, under its --artifacts-destination, and a user reads
  only those of what they may read: an experiment gets no client-chosen artifact_location, a trace
  no client-set artifact location tag (where the server reads the trace's data), and a model
  version's source is a runs:/, models:/ or mlflow-artifacts:/ URI. MLflow checks those three
  against the runs and models the user may read
  (https://github.com/mlflow/mlflow/blob/v3.17.2/mlflow/server/handlers.py, _validate_source_run);
  any other source (s3://, file://, http://) it serves with the server's own keys, unchecked.

The counts live in each server worker's memory (`--workers`, 4 by default): a user name gets at most
LOCK_AFTER tries per worker before the locks start, and a restart forgets them.
"""

import secrets
import threading
import time
import urllib.parse

from cachetools import TTLCache
from flask import Response, g, jsonify, request
from werkzeug.security import check_password_hash, generate_password_hash

LOCK_AFTER = 5
LONGEST_LOCK = 15 * 60
# Failures are forgotten an hour after the last one. Bounded: a flood of made-up names evicts the
# oldest counts, at one password hash per attempt.
_failures: TTLCache = TTLCache(maxsize=100_000, ttl=3600)
_failures_lock = threading.Lock()
# Hashed like a real password (werkzeug's default, as MLflow's store), so that checking it costs the same.
_UNKNOWN_USER_HASH = generate_password_hash(secrets.token_urlsafe(16))

MODEL_VERSION_SOURCES = ("runs", "models", "mlflow-artifacts")
TRACE_ARTIFACT_LOCATION_TAG = "mlflow.artifactLocation"  # mlflow.utils.mlflow_tags.MLFLOW_ARTIFACT_LOCATION


def authenticate():
    """The request's Authorization, or the response that refuses it. MLflow asks several times per
    request (each permission check does): decided once, on the first."""
    if "team_login" not in g:
        g.team_login = _decide()
    return g.team_login


def _decide():
    from mlflow.server import auth

    credentials = request.authorization
    if credentials is None or credentials.type != "basic" or not credentials.username or credentials.password is None:
        return auth.make_basic_auth_response()
    username = credentials.username
    wait = locked_for(username, time.monotonic())
    if wait:
        return refusal(
            429,
            "REQUEST_LIMIT_EXCEEDED",
            f"too many failed logins for this user name; try again in {wait} s",
            {"Retry-After": str(wait)},
        )
    if not _password_matches(auth, username, credentials.password):
        record_failure(username, time.monotonic())
        return auth.make_basic_auth_response()
    record_success(username)
    return _rule_broken(auth, username) or credentials


def _password_matches(auth, username: str, password: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        user = auth.store.get_user(username)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        user = None
    matches = check_password_hash(user.password_hash if user else _UNKNOWN_USER_HASH, password)
    # MLflow's own check refuses the admin password it once shipped; so does this one.
    return matches and user is not None and not auth._is_disabled_legacy_admin_login(username, password, user)


def locked_for(username: str, now: float) -> int:
    """Seconds (rounded up) until username may try again; 0 when it may now."""
    with _failures_lock:
        _, until = _failures.get(username, (0, now))
    return max(0, int(until - now + 0.999))


def record_failure(username: str, now: float) -> None:
    with _failures_lock:
        count, _ = _failures.get(username, (0, now))
        count += 1
        lock = min(2 ** (count - LOCK_AFTER), LONGEST_LOCK) if count >= LOCK_AFTER else 0
        _failures[username] = (count, now + lock)


def record_success(username: str) -> None:
    with _failures_lock:
        _failures.pop(username, None)


def refusal(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    # MLflow's error shape: its client shows "<code>: <message>".
    response = jsonify({"error_code": code, "message": message})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def forbidden(message: str) -> Response:
    return refusal(403, "PERMISSION_DENIED", message)


def _rule_broken(auth, username: str) -> Response | None:
    """The refusal of a request that breaks one of the rules in the module's docstring; None otherwise."""
    from mlflow.protos.model_registry_pb2 import CreateModelVersion
    from mlflow.protos.service_pb2 import CreateExperiment
    from mlflow.server.handlers import _get_request_message  # the handlers' own parsing of the body

    endpoint = request.endpoint
    if endpoint == "list_users" and not auth.store.get_user(username).is_admin:
        return forbidden("only admins list users")
    if endpoint == "_create_experiment":
        location = _get_request_message(CreateExperiment()).artifact_location
        if location:
            return forbidden(
                f"artifact_location {location!r} refused: this server keeps every experiment's artifacts "
                "under its own destination; create the experiment without one"
            )
    if endpoint == "_create_model_version":
        source = _get_request_message(CreateModelVersion()).source
        if urllib.parse.urlsplit(source).scheme.lower() not in MODEL_VERSION_SOURCES:
            return forbidden(
                f"model version source {source!r} refused: register runs:/<run id>/<path>, "
                "models:/<name>/<version> or models:/<model id>, of what you may read"
            )
    # Any route that writes a trace's tags (set-tag, end-trace, ...) could set it; its body names it.
    if "trace" in (endpoint or "") and TRACE_ARTIFACT_LOCATION_TAG in request.get_data(as_text=True):
        return forbidden(f"the trace tag {TRACE_ARTIFACT_LOCATION_TAG} is the server's to set")
    return None
