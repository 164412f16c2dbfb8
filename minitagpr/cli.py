"""How a recipe ends on bad input: one line on stderr that names the problem (file, record, field, key), exit
status 1 -- never a stack trace from deep inside. Bugs (anything else) still raise with their traceback.

    if __name__ == "__main__":
        with exit_on_user_error("guided_rl"):
            main(sys.argv[1:])

Under torchrun every rank that hits the error prints it, tagged with its rank (a config error prints once per rank).
"""
from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from typing import Callable

from minitagpr import distributed as D
from minitagpr.config import ConfigError
from minitagpr.data.chain_client import CacheError, EndpointError
from minitagpr.data.lamp import DataError
from minitagpr.data.preferences import PreferenceDataError
from minitagpr.model.checkpoint import CheckpointError
from minitagpr.model.qwen3 import ConfigError as ModelConfigError
from minitagpr.rl.loop import NonFiniteError
from minitagpr.rollout.base import RolloutError
from minitagpr.tokenizer import TokenizerError
from minitagpr.train.loss import NonFiniteLossError
from minitagpr.train.sft_data import DataError as SftDataError

# Errors whose message already says what is wrong and where. Besides these, any OSError that names a path (a
# missing file, an unwritable or read-only out_dir, a file where a folder should be...) is the user's to fix.
USER_ERRORS = (ConfigError, ModelConfigError, DataError, SftDataError, PreferenceDataError, CheckpointError,
               TokenizerError, RolloutError, NonFiniteError, NonFiniteLossError, CacheError, EndpointError,
               FileNotFoundError, IsADirectoryError)


# A full disk or quota met by a write() carries no path, but is the user's to fix all the same.
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def is_user_error(err: BaseException) -> bool:
    return isinstance(err, USER_ERRORS) or (isinstance(err, OSError) and (err.filename is not None
                                                                          or err.errno in FULL_DISK))


@contextmanager
def exit_on_user_error(name: str):
    """Turn a user error (`is_user_error`) into `[name] error: <message>` on stderr and exit status 1."""
    try:
        yield
    except (*USER_ERRORS, OSError) as err:
        if not is_user_error(err):
            raise
        world = int(os.environ.get("WORLD_SIZE", "1"))
        where = f" (rank {os.environ.get('RANK', '0')})" if world > 1 else ""
        print(f"[{name}] error{where}: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


def run_recipe(name: str, body: Callable[[], object]) -> None:
    """A recipe's run: `body()`, the process group torn down whatever happens (`distributed.destroy_distributed`),
    and a user error ended as in `exit_on_user_error`. The recipe's `__main__` then calls
    `distributed.end_process()`."""
    with exit_on_user_error(name):
        try:
            body()
        finally:
            D.destroy_distributed()

