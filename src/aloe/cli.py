"""Command line: ``aloe run parameters/<experiment>.yaml [--only STAGE ...]``.

User errors (bad parameters, unknown model, unreachable server) print one clear
message and exit 2; a failed stage exits 1 and names its executed notebook.
"""

from __future__ import annotations

import argparse
import logging
import sys

from aloe.errors import AloeError, ConfigError, StageFailed


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aloe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run an experiment's notebooks with Papermill")
    p_run.add_argument("params", help="parameter file, e.g. parameters/default.yaml")
    p_run.add_argument("-v", "--verbose", action="store_true", help="stream every cell's output")
    p_run.add_argument(
        "--only",
        action="append",
        metavar="STAGE",
        help="run only this stage (repeatable): personas, trees, train, evaluate, report",
    )
    p_check = sub.add_parser("check", help="validate a parameter file without running anything")
    p_check.add_argument("params")
    p_est = sub.add_parser(
        "estimate", help="calls, tokens, cost and time per stage and role, before a run (no key, no network)"
    )
    p_est.add_argument("params")
    p_est.add_argument("--sample", type=int, default=8, help="personas run per stage, then scaled (default 8)")
    p_est.add_argument(
        "--fill", type=float, default=1.0, help="replies' length as a share of their cap (default 1.0: an upper bound)"
    )
    p_est.add_argument("--latency", type=float, default=5.0, help="seconds per served call (default 5)")
    p_est.add_argument(
        "--replies-from",
        metavar="DIR",
        help="a finished run's data folder (e.g. a pilot with a few personas): size replies at the mean "
        "length it recorded per model and prompt instead of at their cap",
    )
    p_report = sub.add_parser("report", help="rebuild the results page and figures from existing outputs")
    p_report.add_argument("params")
    p_model = sub.add_parser("prepare-model", help="resolve a model; convert the embedded GGUF once")
    p_model.add_argument("model", nargs="?", default="smollm2-135m")
    return parser


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "run":
        from aloe.runner import run_experiment

        run_experiment(args.params, args.only, log_output=args.verbose)
    elif args.command == "check":
        from aloe.config import STAGES, load_experiment
        from aloe.runner import check_experiment

        exp = load_experiment(args.params)
        check_experiment(exp, list(STAGES))
        print(f"{args.params}: ok (experiment {exp.name!r})")
    elif args.command == "estimate":
        from aloe.config import load_experiment
        from aloe.estimate import estimate, pilot_personas, reply_lengths, table

        if args.sample < 1 or not 0 < args.fill <= 1 or args.latency <= 0:
            raise ConfigError("estimate: --sample must be at least 1, --fill in (0, 1], --latency above 0")
        exp = load_experiment(args.params)
        replies = reply_lengths(args.replies_from) if args.replies_from else None
        lines = estimate(exp, args.sample, args.fill, args.latency, replies)
        print(table(lines, args.latency, args.fill, args.replies_from, pilot_personas(exp)))
    elif args.command == "report":
        from aloe.runner import rebuild_report

        print(rebuild_report(args.params))
    elif args.command == "prepare-model":
        from aloe.models import hf_location, resolve_model

        print(hf_location(resolve_model(args.model)))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "verbose", False):
        logging.getLogger("papermill").setLevel(logging.WARNING)
    try:
        _dispatch(args)
    except ConfigError as e:
        print(f"aloe: configuration error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"aloe: error: {e}", file=sys.stderr)
        return 1
    except AloeError as e:  # anything else the user can fix: bad file, unknown model, unreachable server
        print(f"aloe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aloe: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:  # a disk full, a folder without permission: the system's words and the path
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"aloe: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except RecursionError:
        print("aloe: error: an input is nested too deeply to process", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
