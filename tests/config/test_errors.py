"""Every user-facing error derives from one base class that carries its exit code, so an entry point catches
one class: 2 for bad input, 1 for a run that cannot go on."""

from loop.config import ConfigError, NonFiniteStep, UserError
from loop.data.records import DataError
from loop.data.templates import TemplateError
from loop.engine.zero3_files import ConsolidationError, UntrustedCheckpoint
from loop.evaluation.tasks import ProblemsError
from loop.model.estimate import EstimateError
from loop.report.trackers import TrackerError
from loop.state.checkpoints import CheckpointError
from loop.state.export import ExportError
from loop.state.rundir import DirectoryInUse


def test_user_errors_share_one_base_with_their_exit_code():
    bad_input = [ConfigError, DataError, TemplateError, TrackerError, DirectoryInUse, EstimateError, ProblemsError]
    cannot_go_on = [CheckpointError, ExportError, ConsolidationError, UntrustedCheckpoint, NonFiniteStep]
    assert all(issubclass(e, UserError) and e.exit_code == 2 for e in bad_input)
    assert all(issubclass(e, UserError) and e.exit_code == 1 for e in cannot_go_on)
    assert issubclass(NonFiniteStep, FloatingPointError) and issubclass(DataError, ValueError)  # as before

