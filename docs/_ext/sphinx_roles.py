"""Griffe extension for metarun's docstrings, which are Google style with Sphinx habits that
mkdocstrings does not read:

- roles (``:func:`inner_loop```), which it would print as they are: each becomes a
  cross-reference when its target lies in a module the API pages render, so that a renamed or
  removed target fails ``mkdocs build --strict``, and plain code otherwise (torch, or metarun
  internals the site does not document);
- ``text::`` before an indented block, reST's literal-block marker, which would show as two
  colons (the block itself is already Markdown code: it is indented);
- ``#:`` comments above a module or class attribute, which Sphinx reads as its docstring and
  griffe ignores: they become the attribute's docstring.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# "Example::" alone would become a Google "Example:" section, which parses its block as doctest.
LITERAL_TITLE = re.compile(r"^(\s*)(Examples?)::[ \t]*$", re.MULTILINE)
LITERAL_MARK = re.compile(r"::[ \t]*$", re.MULTILINE)
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`(~?)([\w.]+)(\(\))?`")


class SphinxRoles(griffe.Extension):
    def __init__(self, linked: list[str] | None = None) -> None:
        # Modules (and everything under them) whose objects the API pages render.
        self.linked = tuple(linked or ())

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self.pkg = pkg
        # Where each name is defined in the package: a name the docstring's scope does not
        # import may still name one object unambiguously (Sphinx finds it the same way).
        self.defined: dict[str, list[str]] = {}
        self._index(pkg)
        self._walk(pkg, set())

    def _index(self, obj: griffe.Object | griffe.Alias) -> None:
        if obj.is_alias:
            return
        self.defined.setdefault(obj.name, []).append(obj.path)
        for member in obj.members.values():
            self._index(member)

    def _walk(self, obj: griffe.Object | griffe.Alias, seen: set[str]) -> None:
        if obj.is_alias or obj.path in seen:
            return
        seen.add(obj.path)
        if obj.is_attribute and obj.docstring is None:
            self._comment_docstring(obj)
        if obj.docstring is not None:
            value = ROLE.sub(lambda m: self._ref(obj, m), obj.docstring.value)
            value = LITERAL_TITLE.sub(r"\1**\2**", value)
            obj.docstring.value = LITERAL_MARK.sub(":", value)
        for member in obj.members.values():
            self._walk(member, seen)

    @staticmethod
    def _comment_docstring(obj: griffe.Object) -> None:
        if obj.lineno is None or obj.filepath is None or isinstance(obj.filepath, list):
            return
        lines = obj.filepath.read_text().splitlines()
        comment: list[str] = []
        index = obj.lineno - 2
        while index >= 0 and lines[index].strip().startswith("#:"):
            comment.insert(0, lines[index].strip()[2:].strip())
            index -= 1
        if comment:
            obj.docstring = griffe.Docstring("\n".join(comment), parent=obj)

    def _ref(self, obj: griffe.Object, match: re.Match[str]) -> str:
        tilde, target, call = match.groups()
        shown = (target.rsplit(".", 1)[-1] if tilde else target) + (call or "")
        full = self._canonical(self._resolve(obj, target))
        if not self._is_linked(full):
            return f"`{shown}`"
        return f"[`{shown}`][{full}]"

    def _is_linked(self, path: str) -> bool:
        return any(path == m or path.startswith(m + ".") for m in self.linked)

    def _canonical(self, path: str) -> str:
        # A re-export (metarun.unroll.inner_loop) links to where the object is rendered.
        if not path.startswith(self.pkg.path + "."):
            return path
        try:
            found = self.pkg[path[len(self.pkg.path) + 1 :]]
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return path
        try:
            return found.canonical_path
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return path

    def _resolve(self, obj: griffe.Object, target: str) -> str:
        if target == self.pkg.path or target.startswith(self.pkg.path + "."):
            return target
        head, _, rest = target.partition(".")
        try:
            base = obj.resolve(head)
        except griffe.NameResolutionError:
            found = self.defined.get(head, [])
            if len(found) != 1:
                # A typo or a removed object: the link to where it would be fails the strict
                # build rather than showing as plain code.
                return f"{obj.module.path}.{target}"
            base = found[0]
        return f"{base}.{rest}" if rest else base
