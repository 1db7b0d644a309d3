"""The schema's check inside Hydra's composition, wherever it composes conf/: `dvc exp run -S` included.

`dvc exp run -S key=value` composes conf/ in DVC's own process before any stage runs, and first imports
the Hydra plugins found under its `hydra.plugins_path`, this repository's root (load_hydra_plugins in
https://github.com/iterative/dvc/blob/3.67.1/dvc/utils/hydra.py), so this module is loaded there. Hydra
has no hook for a schema of plain YAML configs, so its composition function is wrapped:
a misspelt key gets the project's line (the keys allowed) instead of Hydra's "To append to your config
use +key=value", an appended key or a bad value is refused too, and DVC stops before it writes
params.yaml or runs anything (the workspace's changes it stashed to compose are restored). In
`make params`, Hydra loads it the same way (the repository's root is on sys.path) and
pipeline.config.compose gives the same line without it.
"""

import sys
from pathlib import Path

import yaml
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import config, runtime
from pipeline.errors import PipelineError

_load_configuration = ConfigLoaderImpl._load_configuration_impl


def _refusal(error: PipelineError) -> PipelineError:
    """In DVC's process, an error DVC prints as one `ERROR: <message>` line (a DvcException); else as is."""
    if "dvc.exceptions" not in sys.modules:
        return error
    from dvc.exceptions import InvalidArgumentError

    return type("ConfRefused", (PipelineError, InvalidArgumentError), {})(str(error))


def _check_at_the_root() -> None:
    """DVC composes into the working directory's params.yaml: from a subfolder of the project (conf/, say)
    it would write conf/params.yaml, and then refuse that folder's missing dvc.yaml in other words."""
    here = Path.cwd()
    if (here / ".dvc").is_dir():
        return
    root = next((folder for folder in here.parents if (folder / ".dvc").is_dir()), None)
    if root is not None:
        raise PipelineError(
            f"run `dvc exp run` from the project's root, {root}, not from {here.relative_to(root)}/: `cd {root}`"
        )


def load_configuration_checked(self, config_name, overrides, *arguments, **options):
    """Hydra's composition of config_name with the overrides, then the schema's check of the result.
    In DVC's process, first the checkout's claim: a workspace `dvc exp run -S` is refused while another
    dvc run holds the checkout, before DVC writes params.yaml under it (pipeline/runtime.py)."""
    if "dvc.exceptions" in sys.modules:
        try:
            _check_at_the_root()
            runtime.claim_checkout_to_compose()
        except PipelineError as error:
            raise _refusal(error) from None
    try:
        composed = _load_configuration(self, config_name, overrides, *arguments, **options)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as error:
        raise _refusal(config.composition_error(overrides, error)) from None
    try:
        config.validate(OmegaConf.masked_copy(composed, [key for key in composed if key != "hydra"]))
    except PipelineError as error:
        raise _refusal(config.composition_error(overrides, error)) from None
    return composed


if _load_configuration.__name__ != load_configuration_checked.__name__:  # imported once per process
    ConfigLoaderImpl._load_configuration_impl = load_configuration_checked
