"""How scripts end: bad input is one ``error: ...`` paragraph and exit code 2, a NaN loss code 3; a
distributed run shuts its process group down before it returns its code."""

from __future__ import annotations

import contextlib
import pickle
import sys
from typing import Optional

from safetensors import SafetensorError

from ..trainer import NonFiniteLossError
from ..validation import UserInputError, is_write_failure


#: Exit codes of the scripts: bad input (flags, files, data) and a loss that became NaN/inf.
EXIT_USER_ERROR = 2


EXIT_NON_FINITE_LOSS = 3

#: Exit code after a scheduler's SIGTERM/SIGUSR1: a checkpoint was saved and the same command resumes it
#: (128 + SIGTERM, what a process killed by SIGTERM reports; SLURM requeues a job that exits non-zero with
#: ``--requeue``).
EXIT_PREEMPTED = 143


class Preempted(Exception):
    """Training stopped on a preemption signal after saving a checkpoint (the message says which and where)."""


def run_script(main, argv: Optional[list[str]] = None, user_errors: tuple = ()) -> int:
    """Runs a script's ``main(argv)`` and returns its exit code: 0; :data:`EXIT_USER_ERROR` for a
    :class:`UserInputError`, :class:`~c2vkd_hf.data.DataValidationError`, ``FileNotFoundError``, a
    write that failed because of the machine (full disk, read-only, permissions) or one of
    ``user_errors``; :data:`EXIT_NON_FINITE_LOSS` when training stopped on a NaN/inf loss (the last
    complete checkpoint is kept); :data:`EXIT_PREEMPTED` when a SIGTERM/SIGUSR1 stopped it after a checkpoint
    (:class:`~c2vkd_hf.trainer.PreemptionCallback`). These print one ``error: ...`` paragraph on stderr, no traceback
    (under ``accelerate launch``/``torchrun`` too: the process exits with the code); any other
    exception is a bug and propagates with its traceback. Under ``torchrun``/``accelerate launch`` the
    process group is shut down before an exit code is returned (:func:`end_distributed`); a bug leaves it to
    the launcher, since shutting down could wait on ranks still inside a collective."""
    from ..data import DataValidationError

    try:
        main(argv)
        code = 0
    except (UserInputError, DataValidationError, FileNotFoundError, *user_errors) as error:
        print(f"error: {error}", file=sys.stderr)
        code = EXIT_USER_ERROR
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        code = EXIT_NON_FINITE_LOSS
    except Preempted as error:
        print(f"stopped: {error}", file=sys.stderr)
        code = EXIT_PREEMPTED
    except OSError as error:
        if not is_write_failure(error):
            raise
        print(f"error: could not write {error.filename or 'a file'} ({error.strerror}).", file=sys.stderr)
        code = EXIT_USER_ERROR
    end_distributed()
    return code


@contextlib.contextmanager
def user_errors(what: str):
    """Turns the loaders' errors about the user's input (ValueError, OSError, and unreadable
    pickle/safetensors files) into one :class:`UserInputError` that starts with ``what``."""
    try:
        yield
    except (ValueError, OSError) as error:
        message = str(error)
        raise UserInputError(message if what.split()[0] in message else f"{what}: {message}") from None
    except pickle.UnpicklingError:
        # torch.load(weights_only=True) refused the file; never suggest weights_only=False (runs pickled code)
        raise UserInputError(f"{what}: a file is corrupt, or is a pickle holding more than tensors, which is never "
                             f"loaded (only safetensors and torch.load(weights_only=True) are used).") from None
    except SafetensorError as error:
        raise UserInputError(f"{what}: a safetensors file is corrupt or truncated ({error}).") from None


def end_distributed() -> None:
    """Shuts the default ``torch.distributed`` process group down, on every rank, when one is up.

    torch asks for this before a process exits; without it a gloo rank can abort (SIGABRT) while the
    interpreter tears down threads that still hold the group. A no-op outside a distributed run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
