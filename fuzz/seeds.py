"""Write (or check) the committed seed corpus: fuzz/corpus/<target>/<seed name>.

    python -m fuzz.seeds            # rewrite every target's seeds from its `seeds()`
    python -m fuzz.seeds --check    # exit 1 if the files differ from what `seeds()` builds

The seeds are built by code (valid prefaces and frames from our own frame encoder, resources
serialized deterministically, mesh files as text) so they can be regenerated after a format
change; the files are committed so that CI fuzzes from the same starting point every time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fuzz.targets import TARGETS, load

CORPUS = Path(__file__).resolve().parent / "corpus"


def expected(target: str) -> dict[str, bytes]:
    return load(target).seeds()


def differences(target: str, root: Path = CORPUS) -> list[str]:
    """What differs between `seeds()` and the files on disk, one line each."""
    want = expected(target)
    folder = root / target
    have = {p.name: p.read_bytes() for p in folder.iterdir()} if folder.is_dir() else {}
    out = [f"{target}/{n}: missing" for n in sorted(want.keys() - have.keys())]
    out += [f"{target}/{n}: not built by seeds()" for n in sorted(have.keys() - want.keys())]
    out += [
        f"{target}/{n}: content differs" for n in sorted(want) if n in have and have[n] != want[n]
    ]
    return out


def write(target: str, root: Path = CORPUS) -> int:
    folder = root / target
    folder.mkdir(parents=True, exist_ok=True)
    want = expected(target)
    for stale in folder.iterdir():
        if stale.name not in want:
            stale.unlink()
    for name, data in want.items():
        (folder / name).write_bytes(data)
    return len(want)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fuzz.seeds", description=__doc__.split("\n")[0]
    )
    parser.add_argument("targets", nargs="*", help="default: all")
    parser.add_argument("--check", action="store_true", help="only compare with the files")
    args = parser.parse_args(argv)
    targets = args.targets or list(TARGETS)
    if args.check:
        problems = [line for t in targets for line in differences(t)]
        for line in problems:
            print(f"fuzz seeds: {line} (run `python -m fuzz.seeds`)", file=sys.stderr)
        return 1 if problems else 0
    for t in targets:
        print(f"fuzz seeds: {t}: {write(t)} files in {CORPUS / t}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
