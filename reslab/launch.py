"""`reslab torchrun`: torchrun (torch.distributed.run) running `-m reslab`, with reslab's exit
statuses. torchrun itself exits 1 whenever a worker fails and meets its agents with a 600 s
wait that ends in a traceback; here a user's error (a worker's exit 2, already printed once by
rank 0) ends the launcher with 2 too, and agents that do not meet within --rendezvous-timeout
end with one line and 2. Anything else (a crash, a signal) keeps torchrun's report and 1."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

_USER_ERROR = 2  # a worker's exit status for a user's error (cli.options.fail)


def _rendezvous_timeout(command: Sequence[str], default: float) -> float:
    """The reslab command's --rendezvous-timeout, the one limit on every wait for the others
    (the agents' here, the ranks' in distributed.process_group), read as argparse reads it."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("--rendezvous-timeout", type=float, default=default)
    try:
        return parser.parse_known_args(list(command))[0].rendezvous_timeout
    except argparse.ArgumentError:
        return default  # reslab's own parser names the bad value in the workers


def _endpoint(args) -> str:  # noqa: ANN001 (torchrun's argparse namespace)
    if args.rdzv_endpoint:
        return args.rdzv_endpoint
    return f"{args.master_addr}:{args.master_port}"


class _QuietStops(logging.Filter):
    """Drops the agent's lines on stopping workers (which signal it sends, which exit it saw):
    a user's error was said in one line by the worker, and a failure's report below says it
    all."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("torch.distributed.elastic.multiprocessing")


def torchrun(argv: Sequence[str]) -> int:
    """`reslab torchrun [TORCHRUN OPTIONS] COMMAND ...` = `torchrun [OPTIONS] -m reslab COMMAND
    ...`; returns the exit status."""
    # c10d logs every failed try to reach the store with a C++ stack trace: muted in this
    # process (the level is read as torch loads), not in the workers it starts.
    mute = "TORCH_CPP_LOG_LEVEL" not in os.environ and "torch" not in sys.modules
    if mute:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import get_args_parser, run

    from reslab.distributed import RENDEZVOUS_TIMEOUT, first_line

    if mute:
        del os.environ["TORCH_CPP_LOG_LEVEL"]
    parser = get_args_parser()
    parser.prog = "reslab torchrun"

    def error(message: str) -> None:  # one line, as reslab's own parser
        if "training_script" in message:  # torchrun's names for the command
            message = ("no reslab command after torchrun's options; e.g. reslab torchrun "
                       "--nproc-per-node 2 train resnet20 --data DATA --out RUN")
        print(f"reslab torchrun: error: {message}; see reslab torchrun --help", file=sys.stderr)
        raise SystemExit(_USER_ERROR)

    parser.error = error  # type: ignore[method-assign]
    try:
        args = parser.parse_args(list(argv))  # COMMAND lands in training_script
    except SystemExit as e:  # --help (0) or error() above (2)
        return e.code if isinstance(e.code, int) else _USER_ERROR
    command = [args.training_script, *args.training_script_args]
    args.module, args.no_python = True, False
    args.training_script, args.training_script_args = "reslab", command
    limit = _rendezvous_timeout(command, RENDEZVOUS_TIMEOUT)
    conf = args.rdzv_conf
    for key in ("timeout", "join_timeout"):  # static rendezvous, c10d rendezvous
        if f"{key}=" not in conf:
            conf = f"{conf},{key}={int(limit)}" if conf else f"{key}={int(limit)}"
    args.rdzv_conf = conf
    for handler in logging.getLogger("torch.distributed").handlers:  # torch's own, not root's
        handler.addFilter(_QuietStops())
    try:
        run(args)
    except SignalException as e:  # the workers were stopped with it: their hint is printed
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        _, first = e.get_first_failure()  # the others were stopped by the agent
        if first.exitcode == _USER_ERROR:
            return _USER_ERROR
        print(e.format_msg(), file=sys.stderr)
        return 1
    except (RendezvousError, DistError) as e:  # the agents' store: meeting, keeping in touch
        print(f"reslab torchrun: error: the agents did not meet at {_endpoint(args)} within "
              f"{limit:g} s ({type(e).__name__}: {first_line(e)}); check --rdzv-endpoint (or "
              "--master-addr and --master-port) and that every node started, or wait longer with "
              "--rendezvous-timeout", file=sys.stderr)
        return _USER_ERROR
    return 0
