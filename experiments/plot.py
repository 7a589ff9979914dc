"""``python -m experiments.plot CKPT_DIR [CKPT_DIR ...] --out curves.png``: the training curves of one or
several runs, overlaid (:mod:`smallssl.curves` reads the logs and draws them)."""

from __future__ import annotations

import argparse
import sys

from smallssl.curves import LOG_FILES, SERIES_KEYS, write_curves
from smallssl.errors import UserError, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m experiments.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt_dirs", nargs="+", metavar="CKPT_DIR",
                   help="run directories holding steps.jsonl and/or log.jsonl")
    p.add_argument("--out", default="curves.png", help="PNG to write")
    p.add_argument("--title", default=None, help="figure title")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("experiments.plot needs matplotlib: pip install -e .[viz]") from None
    if not write_curves(args.ckpt_dirs, args.out, args.title):
        raise UserError(f"nothing to plot: no record in {' or '.join(LOG_FILES)} with a 'step' and one of "
                         f"{', '.join(SERIES_KEYS)}")
    print(f"=> wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
