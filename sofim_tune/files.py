"""Writing files safely and showing storage URLs safely: used by every layer that writes or prints."""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

from sofim_tune.errors import UserInputError

__all__ = ["MAX_JSON_BYTES", "read_head", "read_json", "redact_storage_message", "redact_storage_url", "storage_password", "write_text_atomic"]


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` all at once, creating missing parent folders.

    The text goes to a temporary file in the same folder, which then replaces ``path``
    (``os.replace`` is atomic within one file system): readers see the old file or the
    new one, never half of one, and a failure leaves any existing file untouched and no
    temporary file behind.

    Raises:
        UserInputError: the folder cannot be created or written.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; these are reports meant to be read and shared.
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise UserInputError(f"{path}: cannot write: {e.strerror or e}") from e
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return path


# The user-info of a URL: a user name, then a password up to the last "@" before any query, so
# that an unescaped "@" or "/" inside the password still belongs to it (as SQLAlchemy reads
# "/", and unlike how it reads "@").
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@?#]*):(?P<password>[^?#]*)@(?P<rest>[^@?#]*(?:[?#].*)?)$", re.S)
_LOOSE_USERINFO = re.compile(r"(?P<user>[^:/@\s]+):(?!\*\*\*@)[^/@\s]*@")
_QUERY_SECRET = re.compile(r"(?P<key>[?&](?:password|passwd|pwd)=)[^&#]*", re.I)


def redact_storage_url(url: str) -> str:
    """Replace any password in a storage URL by ``***``; never raises.

    ``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``; a
    ``password=`` query parameter is hidden too. URLs without credentials
    (``sqlite:///runs/x/study.db``, ``journal:./study.log``) come back unchanged.
    This is the one place that redacts; every module that shows a storage URL calls it.
    """
    match = _USERINFO.match(url)
    if match is not None:
        url = f"{match['scheme']}{match['user']}:***@{match['rest']}"
    # Malformed URLs ("user:secret@host/db", "postgresql:/u:pw@h") fall through the pattern
    # above; any user:password@ left anywhere is hidden too.
    url = _LOOSE_USERINFO.sub(lambda m: m["user"] + ":***@", url)
    return _QUERY_SECRET.sub(lambda m: m["key"] + "***", url)


def storage_password(url: str) -> str:
    """The password in a storage URL's user-info (everything between the first ``:`` and the
    last ``@``, escaped or not) or its ``password=`` query parameter; ``""`` when it has none."""
    match = _USERINFO.match(url)
    if match is not None:
        return match["password"]
    query = _QUERY_SECRET.search(url)
    return url[query.end("key") : query.end()] if query is not None else ""


# Pieces of a password shorter than this are left in a message: "db" or "123" would otherwise
# blank out ordinary words and numbers, and give nothing away.
_SHORTEST_SECRET_PIECE = 3


def redact_storage_message(message: str, url: str) -> str:
    """``message`` (a driver's or SQLAlchemy's error about ``url``) with the URL and every piece
    of its password hidden by ``***``; never raises.

    A driver that parsed a malformed URL may quote part of the password as a host or a user
    name (``host 'ret99Z@127.0.0.1'`` from ``bob:Sec@ret99Z@127.0.0.1``), so the password is
    hidden whole and in every piece between its ``@`` and ``:`` of at least three characters,
    as written, percent-decoded and percent-encoded.
    """
    password = storage_password(url)
    written = {piece for form in (password, urllib.parse.unquote(password)) for piece in (form, *re.split(r"[@:]", form))}
    pieces = written | {urllib.parse.quote(piece, safe="") for piece in written}
    message = redact_storage_url(message)
    for piece in sorted((p for p in pieces if len(p) >= _SHORTEST_SECRET_PIECE), key=len, reverse=True):
        message = message.replace(piece, "***")
    return message


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


MAX_JSON_BYTES = 1024 * 1024
"""The largest JSON file any command reads (best.json, run.json, compare.json, --enqueue), as for
YAML and TOML: every file sofim-tune writes is far smaller, so a larger one is not ours."""


def read_head(path: str | Path, limit: int) -> bytes | None:
    """At most the first ``limit`` bytes of the regular file ``path``; None when it does not exist.

    The one way a user's file is opened for reading: without blocking, so that a named pipe is
    refused instead of waiting for a writer for ever, and no further than ``limit``, so that
    ``/dev/zero`` or a huge file costs nothing. Raises UserInputError, in a few words without the
    path, for a folder, a device, pipe or socket, a path with a NUL byte, or an unreadable file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except ValueError:  # a NUL byte in the path
        raise UserInputError("not a valid path") from None
    except OSError as e:
        raise UserInputError(e.strerror or str(e)) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)  # before fdopen, which refuses a folder's descriptor
        raise UserInputError("a folder, not a regular file" if stat.S_ISDIR(mode) else "not a regular file (a device, pipe or socket)")
    with os.fdopen(fd, "rb") as f:
        try:
            return f.read(limit)
        except OSError as e:
            raise UserInputError(e.strerror or str(e)) from None


def read_json(path: str | Path, prefix: str) -> Any:
    """The JSON document in ``path`` (data only: nothing is executed).

    Every problem raises one line, ``"<prefix>: <what>"``: a missing or unreadable file or a path
    with a NUL byte, a folder, device or named pipe instead of a file, a file over
    :data:`MAX_JSON_BYTES` (read no further, so ``/dev/zero`` costs nothing), text that is not
    UTF-8 or not JSON, nesting too deep for the parser, and the NaN and Infinity that Python's
    json would accept.
    """
    try:
        data = read_head(path, MAX_JSON_BYTES + 1)
    except UserInputError as e:
        raise UserInputError(f"{prefix}: {e}") from None
    if data is None:
        raise UserInputError(f"{prefix}: no such file")
    if len(data) > MAX_JSON_BYTES:
        raise UserInputError(f"{prefix}: larger than {MAX_JSON_BYTES // 1024 // 1024} MiB, which no sofim-tune file is")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserInputError(f"{prefix}: not UTF-8 text") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise UserInputError(f"{prefix}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise UserInputError(f"{prefix}: JSON nested too deeply") from None
    except ValueError as e:  # NaN, Infinity, -Infinity
        raise UserInputError(f"{prefix}: invalid JSON: {e}") from None
