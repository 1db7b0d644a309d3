"""The README's commands run verbatim, in a new shell, on a tiny configuration: none can silently rot.

The quick start, changing parameters and reproduce sections are run in order, block by block, in a
copy of the project whose conf/ is shrunk; `make test` itself is left out (it is what runs this).
"""

import re
import subprocess

import mlflow
import pytest

from tests.helpers import REPO, TINY, make_project, venv_for

SECTIONS = ("Quick start", "Changing parameters", "Reproduce a result")


def readme_blocks(section: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", body, re.DOTALL)


def test_the_sections_have_commands():
    assert all(readme_blocks(section) for section in SECTIONS)


@pytest.mark.slow
def test_readme_commands_run_verbatim(tmp_path, mnist_url):
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
    # The reproduce section shows `REV=HEAD` first; HEAD must hold a result first: run the block that
    # commits one ("my result") before it, as a user following it on their own result would.
    blocks.sort(key=lambda block: "REV=HEAD" in block)
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
            f"README block failed:\n{commands}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
