"""The run's config, the ground floor of `loop`: every setting and value list (settings.py), reading YAML
and `--key value` overrides with every error naming its key (parse.py), `--help` (usage.py), and the
one-line errors every stage uses (errors.py).

May import: nothing else of `loop`, and neither torch nor transformers (tests/test_layout.py checks both),
so that every module and tool can read a config cheaply.
"""

from loop.config.errors import ConfigError, NonFiniteStep, RunError, UserError, did_you_mean, first_line, not_a_file
from loop.config.parse import (
    RUN_IDENTITY,
    differences,
    from_argv,
    from_dict,
    from_file,
    parse_overrides,
    save,
    to_dict,
)
from loop.config.settings import (  # the value lists
    ATTENTION_LAYOUT,
    PACKABLE_ATTENTION,
    Attention,
    Config,
    DataConfig,
    DataSource,
    DpoLoss,
    DpoReference,
    DpoSettings,
    EvaluationSettings,
    Format,
    Layout,
    LoraSettings,
    ModelConfig,
    OasstPaths,
    Objective,
    OutputConfig,
    PackingMode,
    Sandbox,
    SaveDtype,
    Schedule,
    TemplateName,
    Tracker,
    TrainingConfig,
    validate,
)

__all__ = ["ATTENTION_LAYOUT", "Attention", "Config", "ConfigError", "DataConfig", "DataSource", "DpoLoss",
           "DpoReference", "DpoSettings", "EvaluationSettings", "Format", "Layout", "LoraSettings", "ModelConfig",
           "OasstPaths", "Objective", "OutputConfig", "PACKABLE_ATTENTION", "PackingMode", "RUN_IDENTITY", "Sandbox",
           "SaveDtype", "Schedule", "TemplateName", "Tracker", "TrainingConfig", "did_you_mean", "differences",
           "first_line", "from_argv", "from_dict", "from_file", "not_a_file", "parse_overrides", "save", "to_dict",
           "validate"]
__all__ += ["NonFiniteStep", "RunError", "UserError"]  # the user-facing errors' base classes (errors.py)
