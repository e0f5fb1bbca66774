"""Speed and memory benchmarks (never asserted by tests; report the numbers with the command).

Usage::

    python tools/benchmark.py model   --help   # forward/backward speed, parameters, GFLOPs
    python tools/benchmark.py mapping --help   # test.py sliding-window memory on a large tile
    python tools/benchmark.py align   --help   # prepare_data align memory on a large tile
    python tools/benchmark.py gis     --help   # overviews of a large map, VRT mosaic of thousands of maps

Each subcommand lives in ``tools/benchmarks/<name>.py`` and defines ``add_arguments(parser)`` and
``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tools.benchmarks as _benchmarks  # noqa: E402
from dataset.errors import run_cli  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for info in sorted(pkgutil.iter_modules(_benchmarks.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"tools.benchmarks.{info.name}")
        sub_parser = sub.add_parser(info.name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
