"""The `reslab` command: parse, then call the library.

Exit codes: 0 success; 2 an error the user can fix (a bad option or value, unusable data, a run
folder that cannot be used, a device this machine lacks, a full disk, output closed early),
reported in one line that names the value and the fix, with nothing written; 128+signal a run
stopped by SIGTERM/SIGINT (its checkpoint saved; Ctrl-C before training started writes nothing);
1 a bug in reslab, with its traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence

from .options import ArgumentError, UsageError, fail
from .parser import build_parser
from .run import finetune_fields, train_run
from .tools import BENCH_USES

__all__ = ["BENCH_USES", "ArgumentError", "UsageError", "build_parser", "finetune_fields", "main",
           "train_run"]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line's entry point; every error a user can cause ends here as one line."""
    command = "reslab"
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["torchrun"]:  # torchrun's own options: its parser reads them
        from ..launch import torchrun
        return torchrun(argv[1:])
    try:
        # Ctrl-C while torch and numpy import is deferred to after the imports: raised inside
        # an extension's import it can leave a half-imported module and a bug-like traceback.
        interrupted: list[int] = []
        main_thread = threading.current_thread() is threading.main_thread()  # signals need it
        if main_thread:
            previous = signal.signal(signal.SIGINT,
                                     lambda signum, _frame: interrupted.append(signum))
        try:
            parser = build_parser()
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)
        if interrupted:
            raise KeyboardInterrupt
        args = parser.parse_args(argv)
        command = f"reslab {args.command}"
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except SystemExit as e:  # argparse: 0 for --help
        return e.code if isinstance(e.code, int) else 2
    except ArgumentError as e:  # one line, as "reslab train: error: ..."
        return fail(e.prog, str(e))
    except (UsageError, ValueError) as e:
        return fail(command, str(e))
    except BrokenPipeError:
        # Python's advice: point stdout at devnull, so the interpreter's final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return fail(command, "the output was closed before it was all written (e.g. by head); "
                     "a run folder resumes with the same command")
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return fail(command, f"{where}{e.strerror or e}; check the path, its permissions and "
                     "free space")
    except MemoryError:
        return fail(command, "out of memory; use a smaller --batch-size or a smaller model")
    except KeyboardInterrupt:
        return fail(command, "interrupted (Ctrl-C) before training started or between runs; "
                     "nothing half-written is left: rerun the same command",
                     128 + signal.SIGINT)
    except RuntimeError as e:
        if type(e).__name__ == "OutOfMemoryError":  # torch's; torch may not be imported
            return fail(command, f"out of device memory ({str(e).splitlines()[0]}); use a "
                         "smaller --batch-size or --gradient-checkpointing")
        raise
