"""The command line every stage shares (docs/design.md: "Conventions every stage follows")."""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from utils import processes
from utils.config import ConfigError, load_config
from utils.runs import STAGE_FOLDERS, StageError, is_completed, os_error_text, plain_name, run_root
from utils.stages import Stage

DEFAULT_MODEL_CONFIG = "configs/models/smollm2-135m.yaml"


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit code 2."""


@dataclass
class ConfigFlag:
    """A named flag that overrides one config key, e.g. --batch_size -> training.batch_size."""

    flag: str
    key: str
    type: Callable[[str], Any]
    help: str


def stage_parser(description: str, stage: Stage,
                 config_flags: tuple[ConfigFlag, ...] = ()) -> argparse.ArgumentParser:
    """The flags every stage has; --algo_config (default: the stage's YAML in utils/stages.py) where it has one."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_MODEL_CONFIG, help="model config (configs/models/*.yaml)")
    if stage.algo_config is not None:
        parser.add_argument("--algo_config", default=stage.algo_config,
                            help="method hyperparameters (configs/algorithms/*.yaml)")
    parser.add_argument("--run_id", default="run_001", help="run folder under outputs/")
    parser.add_argument("--output_dir", default=None,
                        help="write this stage's outputs here instead of outputs/<run_id>/<stage folder>")
    parser.add_argument("--seed", type=int, default=42, help="random seed")
    parser.add_argument("--quick_test", action="store_true",
                        help="same code path on a handful of examples and steps (minutes on a CPU)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set training.batch_size=8 (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace this stage's folder if it already holds a completed stage")
    for item in config_flags:
        parser.add_argument(item.flag, type=item.type, default=None, help=f"{item.help} (config: {item.key})")
    parser.set_defaults(_config_flags=config_flags, _algo_defaults=stage.algo_defaults)
    return parser


def resolve_config(args: argparse.Namespace) -> dict:
    plain_name(args.run_id, "--run_id")
    named = {item.key: getattr(args, item.flag.lstrip("-")) for item in args._config_flags}
    try:
        return load_config(args.config, getattr(args, "algo_config", None), args.quick_test, args.overrides, named,
                           algo_defaults=args._algo_defaults)
    except ConfigError as err:  # a value given by a named flag: say which flag
        flag = next((item.flag for item in args._config_flags
                     if named[item.key] is not None and f"'{item.key}'" in str(err)), None)
        raise ConfigError(f"{flag}: {err}" if flag else str(err)) from None


def stage_dir(args: argparse.Namespace, config: dict, stage: str) -> Path:
    """This stage's folder: --output_dir, else outputs/<run_id>/<stage folder>."""
    if args.output_dir:
        return Path(args.output_dir)
    return run_root(args.run_id, config["paths"]["outputs_dir"]) / STAGE_FOLDERS[stage]


def upstream_dir(args: argparse.Namespace, config: dict, stage: str) -> Path:
    """The folder of an earlier stage in the same run (where inputs come from by default)."""
    return run_root(args.run_id, config["paths"]["outputs_dir"]) / STAGE_FOLDERS[stage]


def check_resume(args: argparse.Namespace, out_dir: Path) -> None:
    """--resume (a training stage continuing from its last trainer checkpoint) makes sense on an unfinished folder."""
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other")
    if args.resume and is_completed(out_dir):
        raise UsageError(f"{out_dir} is already completed; nothing to resume")


def setup_logging() -> logging.Logger:
    """Log to stderr; stage_run adds the stage's own logs/stage.log."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr)], force=True)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger("finqa_rl")


def main_guard(main: Callable[[], int | None]) -> None:
    """Run a stage's main(): expected errors become one line on stderr and a non-zero exit."""
    try:
        code = main()
    except (ConfigError, StageError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, UsageError) else 1)
    except OSError as err:  # a file the system would not let us read or write (read-only, disk full, too large)
        where = err.filename if err.filename is not None else "a file"
        print(f"error: cannot read or write {where}: {os_error_text(err)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    processes.finish()
    sys.exit(code or 0)
