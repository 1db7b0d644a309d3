"""The README's and the docs' commands run verbatim, in a new shell, on a tiny configuration: none can rot.

The quick start, changing parameters and reproduce sections of the README, then the ```bash blocks of
the docs pages in DOC_PAGES, are run in order, block by block, in a copy of the project whose conf/ is
shrunk; `make test` itself is left out (it is what runs this). The docs site builds strictly and renders
in a real browser.
"""

import functools
import http.server
import os
import re
import subprocess
import threading
from pathlib import Path

import mlflow
import PIL.Image
import pytest
import yaml

from tests.helpers import CHROMIUM, REPO, TINY, QuietHandler, make_project, render, venv_for

SECTIONS = ("Quick start", "Changing parameters", "Reproduce a result")
# The docs pages whose ```bash blocks are commands a user types, run after the README's, in this order.
# A page joins by being listed here; illustrative commands and output go in ```text blocks.
DOC_PAGES = (
    "getting-started.md",
    "install.md",
    "configuration.md",
    "tracking.md",
    "reproducibility.md",
    "development.md",
    "warm.md",
    "ui.md",
    "comparison.md",
    "mistakes.md",
)
README_LINES, README_WIDTH = 199, 120
MKDOCS = REPO / ".venv/bin/mkdocs"


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def readme_blocks(section: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    return bash_blocks(text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0])


def doc_blocks(page: str) -> list[str]:
    return bash_blocks((REPO / "docs" / page).read_text())


def test_the_sections_and_pages_have_commands():
    assert all(readme_blocks(section) for section in SECTIONS)
    assert all(doc_blocks(page) for page in DOC_PAGES)


def test_the_readme_reads_in_five_minutes():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    wide = [number for number, line in enumerate(lines, 1) if len(line) > README_WIDTH]
    assert not wide, f"README.md lines over {README_WIDTH} characters: {wide}"


def test_every_docs_page_is_in_the_nav():
    """mkdocs --strict only warns about a page left out of nav when validation says so: check it here too."""
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    listed = {page for entry in nav for page in entry.values()}
    assert listed == {path.name for path in (REPO / "docs").glob("*.md")}
    for page in listed:
        assert (REPO / "docs" / page).read_text().startswith("# "), f"docs/{page} must start with its # Title"


def build_site(destination: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(destination)],
        cwd=REPO,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_docs_build_strictly(tmp_path):
    result = build_site(tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site/getting-started/index.html").exists()


def test_a_broken_docs_link_fails_the_build(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n[a page that does not exist](nowhere.md)\n")
    (tmp_path / "mkdocs.yml").write_text((REPO / "mkdocs.yml").read_text().split("\nnav:", 1)[0])
    result = subprocess.run(
        [str(MKDOCS), "build", "--strict"],
        cwd=tmp_path,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "nowhere.md" in result.stderr


class RecordingHandler(QuietHandler):
    """Serves the built site and records the paths answered with 200 (what the browser really loaded)."""

    served: list[str]

    def send_response(self, code, message=None):
        if code == 200:
            self.served.append(self.path)
        super().send_response(code, message)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_docs_render_in_a_browser(tmp_path):
    site = tmp_path / "site"
    assert build_site(site).returncode == 0
    served: list[str] = []
    handler = type("Handler", (RecordingHandler,), {"served": served})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    screenshots = Path(os.environ.get("SCREENSHOT_DIR", tmp_path))
    screenshots.mkdir(parents=True, exist_ok=True)
    try:
        home = render(f"{url}/", screenshots / "docs-home.png")
        tracking = render(f"{url}/tracking/", screenshots / "docs-tracking.png", height=4200)  # down to the picture
    finally:
        server.shutdown()
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    for title in (title for entry in nav for title in entry):  # the navigation lists every page
        assert f">{title}<" in re.sub(r">\s+", ">", re.sub(r"\s+<", "<", home)), title
    assert "<table>" in home and "<td>download</td>" in home  # the stages table, rendered as a table
    assert '<img alt="The 36 most confident mistakes of the default MLP"' in tracking
    assert "/images/misclassified.png" in served  # the picture was fetched and found
    for screenshot in ("docs-home.png", "docs-tracking.png"):  # drawn, not a blank page
        with PIL.Image.open(screenshots / screenshot) as image:
            assert len(image.convert("L").getcolors(maxcolors=1 << 16)) > 16, screenshot


@pytest.mark.slow
def test_readme_and_docs_commands_run_verbatim(tmp_path, mnist_url):
    project = make_project(tmp_path / "project", TINY, shrink_conf=True)
    venv_for(project)
    # A new login shell's environment: no venv on PATH, no variables of ours but the offline mirror
    # the quick start names (MNIST_MIRROR).
    shell_env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "MNIST_MIRROR": mnist_url,
        "GIT_AUTHOR_NAME": "readme",
        "GIT_AUTHOR_EMAIL": "readme@localhost",
        "GIT_COMMITTER_NAME": "readme",
        "GIT_COMMITTER_EMAIL": "readme@localhost",
    }
    blocks = [block for section in SECTIONS for block in readme_blocks(section)]
    blocks += [block for page in DOC_PAGES for block in doc_blocks(page)]
    # The reproduce section shows `REV=HEAD` first; HEAD must hold a result first: run the block that
    # commits one ("my result") before it, as a user following it on their own result would.
    blocks.sort(key=lambda block: "REV=HEAD" in block)
    try:
        run_blocks(project, blocks, shell_env)
    finally:  # a user's shell starts the warm process (docs/warm.md): stop it with the test
        subprocess.run(["make", "--no-print-directory", "cold"], cwd=project, env=shell_env, capture_output=True)


def run_blocks(project: Path, blocks: list[str], shell_env: dict) -> None:
    """Runs each block in a new bash, in order; the first that fails fails the test."""
    for block in blocks:
        commands = "\n".join(line for line in block.splitlines() if not line.startswith("make test"))
        if "<mlflow run id>" in commands:
            mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
            clean = mlflow.search_runs(
                experiment_names=["mnist"],
                output_format="list",
                max_results=1,
                filter_string="tags.`git.dirty` = 'false'",
                order_by=["attributes.start_time ASC"],
            )
            commands = commands.replace("<mlflow run id>", clean[0].info.run_id)
        result = subprocess.run(
            ["bash", "-e", "-c", commands], cwd=project, env=shell_env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, (
            f"README or docs block failed:\n{commands}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
