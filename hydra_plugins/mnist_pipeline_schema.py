"""The schema's check inside Hydra's composition, wherever it composes conf/: `dvc exp run -S` included.

`dvc exp run -S key=value` composes conf/ in DVC's own process before any stage runs, and first imports
the Hydra plugins found under its `hydra.plugins_path`, this repository's root (load_hydra_plugins in
https://github.com/iterative/dvc/blob/3.67.1/dvc/utils/hydra.py), so this module is loaded there. Hydra
has no hook for a schema of plain YAML configs, so its one function that applies overrides is wrapped:
a misspelt key gets the project's line (the keys allowed) instead of Hydra's "To append to your config
use +key=value", an appended key or a bad value is refused too, and DVC stops before it stashes,
changes or runs anything. In `make params`, Hydra loads it the same way (the repository's root is on
sys.path) and pipeline.config.compose gives the same line without it.
"""

import sys

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipeline import config
from pipeline.errors import PipelineError

_apply_overrides = ConfigLoaderImpl._apply_overrides_to_config


def _refusal(error: PipelineError) -> PipelineError:
    """In DVC's process, an error DVC prints as one `ERROR: <message>` line (a DvcException); else as is."""
    if "dvc.exceptions" not in sys.modules:
        return error
    from dvc.exceptions import InvalidArgumentError

    return type("ConfRefused", (PipelineError, InvalidArgumentError), {})(str(error))


def apply_overrides_checked(overrides, cfg) -> None:
    lines = [override.input_line for override in overrides]
    try:
        _apply_overrides(overrides, cfg)
    except ConfigCompositionException as error:
        raise _refusal(config.composition_error(lines, error)) from None
    if "hydra" not in cfg:
        return  # not a composition of conf/ (DVC applies -S to other params files with this too)
    try:
        config.validate(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]))
    except PipelineError as error:
        raise _refusal(config.composition_error(lines, error)) from None


if getattr(_apply_overrides, "__name__", "") != apply_overrides_checked.__name__:  # imported once per process
    ConfigLoaderImpl._apply_overrides_to_config = staticmethod(apply_overrides_checked)
