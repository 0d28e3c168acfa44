"""The errors a user can fix, listed once. Every command (train.py, sample.py, scripts/*) catches exactly these and
prints the one line "error: ..." (exit status 2; a run that stopped because training failed, TrainingError: 1),
never a traceback. A new error the user can fix is a class of its own module, added here."""

from gpt_residual.checkpoint import CheckpointError
from gpt_residual.config import ConfigError
from gpt_residual.dataset import DataError
from gpt_residual.files import WriteError
from gpt_residual.health import TrainingError
from gpt_residual.hf_export import ExportError
from gpt_residual.pretrained import PretrainedError
from gpt_residual.runtime import DeviceError

USER_ERRORS = (
    ConfigError, DataError, DeviceError, CheckpointError, PretrainedError, ExportError, TrainingError, WriteError,
)
