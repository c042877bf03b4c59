"""Errors a user can cause, each raised before expensive work starts and saying what to do."""

import errno

# errno values that mean "no room": disk full, quota exceeded, file size limit.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class AutomergeError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback."""


class ModelReferenceError(AutomergeError):
    """A model reference cannot be resolved to a local folder with a config and weights."""


class ArchitectureMismatchError(AutomergeError):
    """Source models do not share an architecture or tensor shapes, so they cannot be merged."""


class TokenizerMismatchError(AutomergeError):
    """The models' tokenizers or embedding rows differ and no --tokenizer-source says how the
    merged vocabulary is built."""


class AdapterError(ModelReferenceError):
    """A PEFT adapter cannot be used as a source: unreadable, or made for another base."""


class MissingBaseModelError(AutomergeError):
    """A task-vector method (task_arithmetic, ties, dare_*) was asked for without `--base`."""


class DataError(AutomergeError):
    """Validation data is missing, empty, unreadable or lacks the text column."""


class SettingsError(AutomergeError):
    """Search settings contradict each other or name an unknown method, strategy or parameter."""


class RecipeError(AutomergeError):
    """A recipe cannot be written or read faithfully by mergekit."""


class OutputExistsError(AutomergeError):
    """The output directory exists and `--overwrite` was not given."""


class NoSuccessfulTrialError(AutomergeError):
    """Every trial of a search failed (NaN/inf losses), so there is no recipe to write."""


class RunDirectoryError(AutomergeError):
    """A run directory lacks what a step needs (e.g. `push` before the model was built)."""


class RunInUseError(RunDirectoryError):
    """Another process is writing the run directory (a search, resume, baselines or demo)."""


class InputChangedError(AutomergeError):
    """A model or data file differs from what a run's trials were scored with, so they cannot
    be continued (--resume) or reused (--warm-start)."""


class NonFiniteError(AutomergeError):
    """A source or base model holds NaN/inf weights, or a specialist's own loss is not finite,
    so every merge would fail."""


class StorageError(AutomergeError):
    """A write failed or would fail for lack of space (disk full, quota, file size limit);
    everything saved before it is intact."""


class PublishError(AutomergeError):
    """An upload to the Hub failed; the run directory is intact and the push can be retried."""


class MetricError(AutomergeError):
    """A user metric (`--metric`) raised or returned something other than a finite number."""


class MemoryPlanError(AutomergeError):
    """The search's models, live model, rank cache and activations do not fit the device's and
    the host's free memory in the arrangement asked for (or in any)."""
