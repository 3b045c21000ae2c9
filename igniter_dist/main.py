"""`igniter_main`: parse flags once, start the runtime, run the user's `main(args)`, map errors to exit codes."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .args import build_parser, parse_args
from .errors import IgniterError
from .options import from_args
from .rng import seed_everything
from .runtime import RuntimeOptions, exit_process, init_runtime, runtime, runtime_was_distributed, shutdown_runtime
from .signals import Interrupted
from .wrapping import PrepareOptions, configure


def igniter_main(
    main: Callable[[argparse.Namespace], Any],
    inputs: dict[str, str] | None = None,
    argparse_callback: Callable[[argparse.ArgumentParser], Any] | None = None,
    description: str | None = None,
    argv: list[str] | None = None,
) -> None:
    """Entry point of a training script: the same script runs under python, torchrun and SageMaker.

    Exits 0 on success, 2 on bad input (one sentence on stderr), 3 when a checkpoint cannot be
    written, found or loaded, 128 + N after signal N (the checkpoint of that step saved), 1 on
    any other error.
    """
    code = 0
    rank_prefix = ""
    agreed_exit = False
    try:
        args = parse_args(build_parser(inputs, argparse_callback, description), argv)
        settings = from_args(RuntimeOptions, args)
        rt = init_runtime(device=settings.device, timeout_s=settings.dist_timeout,
                          deterministic=settings.deterministic, debug=args.debug)
        # What ig.prepare does where the script does not say; fsdp/hsdp also gather parameters in --precision.
        configure(replace(from_args(PrepareOptions, args), precision=args.precision))
        rank_prefix = f"[rank {rt.rank}] " if rt.distributed else ""
        seed_everything(args.seed)  # identical model initialisation on every rank
        main(args)
        agreed_exit = True
    except Interrupted as e:
        code = e.exit_code
        agreed_exit = True  # every rank stopped on the same step
        print(f"{rank_prefix}igniter-dist: {e}; exiting with {code}", file=sys.stderr, flush=True)
    except IgniterError as e:
        code = e.exit_code
        print(f"{rank_prefix}error: {e}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        code = 130
    except Exception:
        traceback.print_exc()
        code = 1
    finally:
        distributed = runtime_was_distributed()
        shutdown_runtime(barrier=agreed_exit)
        configure(PrepareOptions())
    exit_process(code, distributed)


__all__ = ["igniter_main", "runtime"]
