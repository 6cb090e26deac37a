"""The manifest: a small sorted TSV listing an image folder, so that a pipeline can depend on one
file instead of hashing every image.

Format (UTF-8)::

    #unite-manifest/1
    #class<TAB>0<TAB>n01440764
    ...
    path<TAB>size<TAB>label
    n01440764/n01440764_10026.JPEG<TAB>13697<TAB>0

One ``#class`` line per class folder, in sorted folder order (torchvision ImageFolder's class
index), empty folders included. Then every file under every class folder, in ImageFolder's order
(class, then sorted walk), with its size in bytes; files directly under the root follow with
label -1. Every file is listed, images or not, so that the sharder can account for each one.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from unite.data.errors import DataError

MANIFEST_FORMAT = "#unite-manifest/1"
_COLUMNS = "path\tsize\tlabel"


@dataclass(frozen=True)
class Manifest:
    """An image folder's classes (index = position) and files as (relative path, bytes, label).

    label is the class index, or -1 for a file directly under the root (in no class).
    """

    classes: list[str]
    rows: list[tuple[str, int, int]]

    @property
    def empty_classes(self) -> list[str]:
        """Class folders that hold no file at all."""
        used = {label for _, _, label in self.rows}
        return [name for label, name in enumerate(self.classes) if label not in used]


def _checked_relpath(root: Path, full: str) -> str:
    rel = Path(full).relative_to(root).as_posix()
    if "\t" in rel or "\n" in rel or "\r" in rel:
        raise DataError(f"{full}: file name contains a tab or newline; manifest paths may not")
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{full!r}: file name is not valid UTF-8; manifest paths must be") from exc
    return rel


def _size(full: str) -> int:
    try:
        return os.stat(full).st_size
    except OSError as exc:
        raise DataError(f"{full}: cannot stat ({exc.strerror}); a broken link?") from exc


def list_image_folder(root: str | Path, *, progress: bool = True) -> Manifest:
    """List an ImageNet-style folder (one sub-folder per class) in ImageFolder's order.

    Raises DataError for a missing root or a root without class folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image-folder root does not exist or is not a directory")
    with os.scandir(root) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    classes = [entry.name for entry in entries if entry.is_dir()]
    if not classes:
        raise DataError(f"{root}: no class folders; an image-folder root holds one folder per class")
    rows: list[tuple[str, int, int]] = []
    bar = tqdm(classes, desc=f"manifest {root.name}", unit="class", disable=not progress)
    for label, name in enumerate(bar):
        for dirpath, _, fnames in sorted(os.walk(root / name, followlinks=True)):
            for fname in sorted(fnames):
                full = os.path.join(dirpath, fname)
                rows.append((_checked_relpath(root, full), _size(full), label))
        bar.set_postfix(files=len(rows), refresh=False)
    for entry in entries:
        if not entry.is_dir():
            rows.append((_checked_relpath(root, entry.path), _size(entry.path), -1))
    return Manifest(classes=classes, rows=rows)


def write_manifest(root: str | Path, path: str | Path, *, progress: bool = True) -> Manifest:
    """List root (see list_image_folder) and write the manifest file atomically.

    Prints a one-line summary on stderr when progress is on.
    """
    manifest = list_image_folder(root, progress=progress)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [MANIFEST_FORMAT]
    lines += [f"#class\t{label}\t{name}" for label, name in enumerate(manifest.classes)]
    lines.append(_COLUMNS)
    lines += [f"{rel}\t{size}\t{label}" for rel, size, label in manifest.rows]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    if progress:
        outside = sum(1 for _, _, label in manifest.rows if label < 0)
        tqdm.write(
            f"manifest {path}: {len(manifest.rows)} files in {len(manifest.classes)} classes "
            f"({len(manifest.empty_classes)} empty classes, {outside} files outside class folders)",
            file=sys.stderr,
        )
    return manifest


def read_manifest(path: str | Path) -> Manifest:
    """Read a manifest written by write_manifest, checking every line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: manifest not found") from exc
    if not lines or lines[0] != MANIFEST_FORMAT:
        first = lines[0] if lines else ""
        raise DataError(f"{path}: first line is {first!r}, a manifest starts with {MANIFEST_FORMAT!r}")
    classes: list[str] = []
    rows: list[tuple[str, int, int]] = []
    header_seen = False
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if not header_seen:
            if line == _COLUMNS:
                header_seen = True
                continue
            if len(fields) != 3 or fields[0] != "#class" or fields[1] != str(len(classes)):
                raise DataError(
                    f"{path}:{number}: {line!r}; expected '#class<TAB>{len(classes)}<TAB>name' "
                    f"or the column header {_COLUMNS!r}"
                )
            classes.append(fields[2])
            continue
        try:
            rel, size, label = fields[0], int(fields[1]), int(fields[2])
        except (ValueError, IndexError) as exc:
            raise DataError(f"{path}:{number}: {line!r}; expected 'path<TAB>size<TAB>label'") from exc
        if len(fields) != 3 or size < 0 or not -1 <= label < len(classes):
            raise DataError(
                f"{path}:{number}: {line!r}; expected 3 fields, size >= 0 and label in "
                f"[-1, {len(classes)})"
            )
        rows.append((rel, size, label))
    if not header_seen:
        raise DataError(f"{path}: no column header {_COLUMNS!r}; the file is incomplete")
    return Manifest(classes=classes, rows=rows)
