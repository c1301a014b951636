"""Build splitwise/assets/corpus.txt: English technical prose for training the tiny model's tokenizer.

The text is the docstrings of a fixed list of Python standard-library modules (PSF licence, which
permits redistribution with the notice kept; see splitwise/assets/CORPUS_NOTICE.txt). Nothing is
downloaded. The output is committed, so the tokenizer (and every generated tiny model) does not
depend on which Python version happens to be installed; rerun this only to refresh the corpus.

Usage: python tools/build_corpus.py [--stdlib DIR] [--max-bytes N] [--out PATH]
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sysconfig
from pathlib import Path

# Prose-heavy modules first: once --max-bytes is reached the rest are skipped, and a fixed order
# keeps the output reproducible for a given stdlib.
MODULES: tuple[str, ...] = tuple(
    """
    argparse.py asyncio/events.py asyncio/streams.py asyncio/tasks.py asyncio/locks.py
    asyncio/queues.py base64.py bisect.py calendar.py codecs.py collections/__init__.py
    concurrent/futures/_base.py configparser.py contextlib.py csv.py dataclasses.py datetime.py
    decimal.py _pydecimal.py difflib.py doctest.py email/message.py enum.py fractions.py functools.py
    gettext.py glob.py gzip.py heapq.py http/client.py http/cookiejar.py imaplib.py inspect.py
    ipaddress.py json/__init__.py json/decoder.py json/encoder.py logging/__init__.py
    logging/handlers.py mailbox.py multiprocessing/pool.py multiprocessing/managers.py numbers.py
    optparse.py os.py pathlib.py pdb.py pickle.py pprint.py queue.py random.py sched.py secrets.py
    selectors.py shlex.py shutil.py smtplib.py socket.py socketserver.py statistics.py string.py
    subprocess.py tarfile.py tempfile.py textwrap.py threading.py timeit.py tokenize.py traceback.py
    typing.py unittest/case.py unittest/mock.py urllib/parse.py urllib/request.py uuid.py warnings.py
    weakref.py zipfile.py
    """.split()
)

NOTICE_HEADER = """corpus.txt in this directory consists of docstrings extracted from the Python standard
library source code by tools/build_corpus.py. Python is distributed under the PSF License
Agreement; its licence text, which must accompany redistributed copies, follows.

Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved.

"""

MIN_WORDS = 6  # shorter docstrings ("Return self.") are noise rather than prose


def module_docstrings(path: Path) -> list[str]:
    """Every module, class and function docstring in source order, dedented."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    nodes = [tree] + [
        n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    docs = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=False)
        if doc and len(doc.split()) >= MIN_WORDS:
            docs.append(inspect.cleandoc(doc))
    return docs


def build(stdlib: Path, max_bytes: int) -> str:
    parts: list[str] = []
    size = 0
    for name in MODULES:
        path = stdlib / name
        if not path.is_file():
            continue
        for doc in module_docstrings(path):
            chunk = doc + "\n\n"
            size += len(chunk.encode("utf-8"))
            if size > max_bytes:
                return "".join(parts)
            parts.append(chunk)
    return "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--max-bytes", type=int, default=300_000)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "splitwise/assets/corpus.txt"
    )
    args = parser.parse_args()
    text = build(args.stdlib, args.max_bytes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    notice = args.out.with_name("CORPUS_NOTICE.txt")
    notice.write_text(
        NOTICE_HEADER + (args.stdlib / "LICENSE.txt").read_text(encoding="utf-8"), encoding="utf-8"
    )
    print(f"wrote {args.out} ({len(text.encode('utf-8'))} bytes) and {notice}")


if __name__ == "__main__":
    main()
