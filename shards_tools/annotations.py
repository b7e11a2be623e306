"""Parsers for the annotation formats users bring, all returning the same `Annotations`.

Formats (see FACTS.md, "Annotation formats users bring"):

- ``kinetics``: a list file, one ``relative/path.mp4 LABEL`` per line (single space,
  LABEL an integer, paths relative to the video root).
- ``csv``: VideoMAE's ``train.csv``/``val.csv``, no header, ``path LABEL`` per line with a
  single space; the path may be absolute or relative to the video root.
- ``ssv2``: Something-Something v2's JSON list of ``{"id", "label", "template",
  "placeholders"}`` plus ``something-something-v2-labels.json`` (template -> index as a
  string); videos are ``<id>.webm`` in the root.
- ``folder``: one folder per class under the root (class = folder name, sorted). Every
  file below a class folder is an entry, whatever its extension: the converter keeps
  each that decodes as a video and lists the rest as skipped with a reason (hidden
  files, whose names start with a dot, without opening them).

A parser only reads the annotations. Malformed lines are errors that name the file and
line, and so is a source that lists no video at all (an empty file, a folder without
class folders); entries that are well formed but cannot be used (a label outside the
class list, a path outside the root, a repeated video) are kept, flagged by
`Item.problem`, so the converter can skip and report them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

FORMATS = ("kinetics", "csv", "ssv2", "folder")

# Reasons an annotation entry is unusable (converter skip reasons start with these).
UNKNOWN_LABEL = "unknown_label"
OUTSIDE_ROOT = "outside_root"
DUPLICATE = "duplicate"
HIDDEN = "hidden"


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One annotated video.

    source: how the annotation names the video (path as written, or the SSv2 id).
    path: the video path relative to the root, normalised with '/' separators ("" when
        the entry points outside the root).
    label: class index, or -1 when the label is not one of the known classes.
    label_text: the label as written in the annotation.
    where: "FILE:LINE" (or "FILE[INDEX]" for JSON) for messages.
    problem: "" for a usable entry, else one of UNKNOWN_LABEL, OUTSIDE_ROOT, DUPLICATE, HIDDEN.
    """

    source: str
    path: str
    label: int
    label_text: str
    where: str
    problem: str = ""


@dataclasses.dataclass
class Annotations:
    items: list[Item]
    class_names: list[str]

    def pairs(self) -> list[tuple[str, int]]:
        """(source, label index) of every entry, in file order."""
        return [(item.source, item.label) for item in self.items]


def relative_to_root(root: str, path: str) -> str | None:
    """`path` (absolute, or relative to `root`) as a normalised path relative to `root`.

    None when it leaves the root (``../x.mp4``, an absolute path elsewhere). The check is
    lexical on purpose: a root that holds symlinks to videos on another disk is fine.
    """
    root_abs = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(path if os.path.isabs(path) else os.path.join(root_abs, path))
    if full != root_abs and not full.startswith(root_abs + os.sep):
        return None
    rel = os.path.relpath(full, root_abs)
    if rel == ".":
        return None
    return rel.replace(os.sep, "/")


def read_class_names(path: str) -> list[str]:
    """A class list file: one class name per line (line N is class N-1), blank lines ignored."""
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if len(set(names)) != len(names):
        raise AnnotationError(f"{path}: class names are not unique")
    return names


def _finish(items: list[Item], class_names: list[str]) -> Annotations:
    """Flag labels outside the class list and repeated videos (first one wins)."""
    seen: set[str] = set()
    out = []
    for item in items:
        problem = item.problem
        if not problem and not 0 <= item.label < len(class_names):
            problem = UNKNOWN_LABEL
        if not problem:
            if item.path in seen:
                problem = DUPLICATE
            seen.add(item.path)
        label = item.label if problem != UNKNOWN_LABEL else -1
        out.append(dataclasses.replace(item, problem=problem, label=label))
    return Annotations(out, class_names)


def _path_label_lines(annotations: str, root: str) -> list[Item]:
    items = []
    with open(annotations) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            where = f"{annotations}:{lineno}"
            # Split on the last space so paths that contain spaces still parse.
            path, sep, label_text = line.rpartition(" ")
            if not sep or not path or not label_text:
                raise AnnotationError(f"{where}: expected 'PATH LABEL' separated by one space, got {line!r}")
            try:
                label = int(label_text)
            except ValueError:
                raise AnnotationError(f"{where}: label {label_text!r} is not an integer (line {line!r})") from None
            rel = relative_to_root(root, path)
            items.append(
                Item(source=path, path=rel or "", label=label, label_text=label_text, where=where,
                     problem="" if rel is not None else OUTSIDE_ROOT)
            )
    return items


def _numbered_classes(items: list[Item], classes_file: str | None) -> list[str]:
    if classes_file:
        return read_class_names(classes_file)
    # Without a class list the classes are 0..max label, named by their index.
    labels = [item.label for item in items if item.label >= 0]
    return [str(i) for i in range(max(labels) + 1)] if labels else []


def parse_kinetics(annotations: str, root: str, classes_file: str | None = None) -> Annotations:
    """MAR's Kinetics list: ``relative/path.mp4 LABEL`` per line, paths relative to `root`."""
    items = _path_label_lines(annotations, root)
    return _finish(items, _numbered_classes(items, classes_file))


def parse_csv(annotations: str, root: str, classes_file: str | None = None) -> Annotations:
    """VideoMAE CSV: ``path LABEL`` per line, no header; path absolute or relative to `root`."""
    items = _path_label_lines(annotations, root)
    return _finish(items, _numbered_classes(items, classes_file))


def ssv2_template_key(template: str) -> str:
    """The form under which SSv2 templates are matched: brackets removed.

    Item templates read "Putting [something] on [something]", while the labels file may
    write the placeholders with or without brackets; both sides go through this function.
    """
    return " ".join(template.replace("[", "").replace("]", "").split())


def read_ssv2_labels(labels_file: str) -> list[str]:
    """``something-something-v2-labels.json`` -> class names ordered by index."""
    with open(labels_file) as f:
        try:
            mapping = json.load(f)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{labels_file}: not valid JSON ({e})") from None
    if not isinstance(mapping, dict):
        raise AnnotationError(f"{labels_file}: expected an object mapping template -> index")
    by_index: dict[int, str] = {}
    for template, index in mapping.items():
        try:
            i = int(index)
        except (TypeError, ValueError):
            raise AnnotationError(f"{labels_file}: index {index!r} of {template!r} is not an integer") from None
        if i in by_index:
            raise AnnotationError(f"{labels_file}: index {i} is used by {by_index[i]!r} and {template!r}")
        by_index[i] = ssv2_template_key(template)
    if sorted(by_index) != list(range(len(by_index))):
        raise AnnotationError(f"{labels_file}: indices must be 0..{len(by_index) - 1} without gaps")
    return [by_index[i] for i in range(len(by_index))]


def parse_ssv2(annotations: str, root: str, labels_file: str, video_ext: str = "webm") -> Annotations:
    """Something-Something v2 JSON list; videos are ``<id>.webm`` directly under `root`."""
    class_names = read_ssv2_labels(labels_file)
    index_of = {name: i for i, name in enumerate(class_names)}
    with open(annotations) as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{annotations}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise AnnotationError(f"{annotations}: expected a JSON list of objects")
    items = []
    for n, record in enumerate(records):
        where = f"{annotations}[{n}]"
        if not isinstance(record, dict) or "id" not in record or "template" not in record:
            raise AnnotationError(f"{where}: expected an object with 'id' and 'template', got {record!r}")
        video_id = str(record["id"])
        key = ssv2_template_key(str(record["template"]))
        rel = relative_to_root(root, f"{video_id}.{video_ext}")
        items.append(
            Item(source=video_id, path=rel or "", label=index_of.get(key, -1), label_text=key, where=where,
                 problem="" if rel is not None else OUTSIDE_ROOT)
        )
    return _finish(items, class_names)


def parse_folder(root: str) -> Annotations:
    """One folder per class under `root` (sorted names); every file anywhere below each
    folder is an entry (hidden ones flagged HIDDEN), so none goes uncounted."""
    if not os.path.isdir(root):
        raise AnnotationError(f"{root}: not a folder")
    class_names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not class_names:
        raise AnnotationError(f"{root}: no class folders (the folder format reads ROOT/CLASS/VIDEO)")
    items = []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(root, name)
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames.sort()
            for filename in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, filename), root).replace(os.sep, "/")
                hidden = filename.startswith(".") or any(part.startswith(".") for part in rel.split("/")[:-1])
                items.append(Item(source=rel, path=rel, label=label, label_text=name, where=rel,
                                  problem=HIDDEN if hidden else ""))
    return _finish(items, class_names)


def parse_annotations(
    fmt: str,
    root: str,
    annotations: str | None = None,
    labels: str | None = None,
    classes: str | None = None,
) -> Annotations:
    """Dispatch on `fmt` (one of FORMATS) with the arguments that format needs."""
    parsers: dict[str, Callable[[], Annotations]] = {
        "kinetics": lambda: parse_kinetics(_need(annotations, "annotations", fmt), root, classes),
        "csv": lambda: parse_csv(_need(annotations, "annotations", fmt), root, classes),
        "ssv2": lambda: parse_ssv2(_need(annotations, "annotations", fmt), root, _need(labels, "labels", fmt)),
        "folder": lambda: parse_folder(root),
    }
    if fmt not in parsers:
        raise ValueError(f"unknown annotation format {fmt!r}; choose one of {', '.join(FORMATS)}")
    result = parsers[fmt]()
    if not result.items:
        if fmt == "folder":
            raise AnnotationError(f"{root}: no files in its class folders")
        raise AnnotationError(f"{annotations}: no entries")
    return result


def _need(value: str | None, name: str, fmt: str) -> str:
    if not value:
        raise ValueError(f"format {fmt!r} needs --{name}")
    return value
