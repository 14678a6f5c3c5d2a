"""The layout of clawdspace.py: pure text and AST checks, no Docker, well under a second.

clawdspace.py is one module cut into banner sections (``# Title ####...`` between two lines of
``#``). These tests keep that shape honest:

* Sections read top-down: code in a section uses only what its own or an earlier section
  defines, so the file can be read (and reviewed) from the low level up.
* One door to Docker: only ``class Engine`` touches the docker-py low-level client (``.api``),
  and nothing reaches into docker-py's or requests' private members.
* Only handlers speak HTTP: ``web.Request``, ``web.Response`` and friends appear only in the
  HTTP-facing sections; the domain below them knows nothing of aiohttp's request objects.
* Labels are spelled in one place: ``f"{LABEL}.<key>"`` is written only where space attributes
  and networks are mapped onto Docker labels.

``python tests/test_layout.py [path]`` prints the same findings as counts (a metrics report).
"""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

SOURCE_PATH = Path(__file__).resolve().parent.parent / "clawdspace.py"
TITLE_LINE = re.compile(r"^# (.+?) #{3,}$")
BANNER_LINE = re.compile(r"^#{20,}$")
PREAMBLE = "(preamble)"
HTTP_SECTIONS = ("HTTP", "Handlers", "E2B surface", "OpenAPI", "App factory", "CLI")
HTTP_NAMES = {"Request", "BaseRequest", "StreamResponse", "WebSocketResponse", "Response",
              "json_response"}
HTTP_IN_TEXT = re.compile(r"\bweb\.(" + "|".join(sorted(HTTP_NAMES)) + r")\b")
LABEL_SECTIONS = ("Space attributes", "Network")
LABEL_SPELLING = re.compile(r"""f["']\{LABEL\}\.""")
PRIVATE_MEMBERS = {"_url", "_get", "_post", "_raise_for_status", "_result", "_sock",
                   "_response", "_version"}


@dataclasses.dataclass(frozen=True)
class Section:
    title: str
    first: int  # first line (the upper banner line), 1-based
    last: int  # last line, inclusive


def sections(source: str) -> list[Section]:
    """The banner sections in file order; lines before the first banner form PREAMBLE."""
    lines = source.splitlines()
    starts: list[tuple[int, str]] = [(1, PREAMBLE)]
    for index, line in enumerate(lines[1:-1], start=1):
        match = TITLE_LINE.match(line)
        if match and BANNER_LINE.match(lines[index - 1]) and BANNER_LINE.match(lines[index + 1]):
            starts.append((index, match.group(1)))  # index is the 1-based upper banner line
    ends = [first - 1 for first, _ in starts[1:]] + [len(lines)]
    return [Section(title, first, last) for (first, title), last in zip(starts, ends, strict=True)]


def owner(all_sections: Sequence[Section], lineno: int) -> Section:
    """The section that line ``lineno`` lies in."""
    return next(s for s in all_sections if s.first <= lineno <= s.last)


def defined_names(statement: ast.stmt) -> list[str]:
    """Module-level names a top-level statement binds (defs, classes, assignments, imports)."""
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [statement.name]
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return [(alias.asname or alias.name).split(".")[0] for alias in statement.names]
    targets: list[ast.expr] = []
    if isinstance(statement, ast.Assign):
        targets = statement.targets
    elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
        targets = [statement.target]
    return [node.id for target in targets for node in ast.walk(target)
            if isinstance(node, ast.Name)]


def annotation_nodes(tree: ast.AST) -> list[ast.expr]:
    """Every annotation under ``tree``: never evaluated, thanks to ``from __future__``."""
    found: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None:
            found.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
            found.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            found.append(node.annotation)
    return found


FunctionNode = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
ScopeNode = (*FunctionNode, ast.ClassDef)


def bound_in(scope: ast.AST) -> set[str]:
    """Names a def, lambda or class binds in its own scope: parameters, assignments, loop and
    with targets, except and import names, nested defs. Comprehension targets count too."""
    bound: set[str] = set()
    declared_global: set[str] = set()
    if isinstance(scope, FunctionNode):
        arguments = scope.args
        bound.update(arg.arg for arg in [*arguments.posonlyargs, *arguments.args,
                                         *arguments.kwonlyargs, arguments.vararg,
                                         arguments.kwarg] if arg is not None)
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            continue  # its own scope
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            declared_global.update(node.names)
        stack.extend(ast.iter_child_nodes(node))
    return bound - declared_global


def free_loads(statement: ast.stmt) -> Iterator[ast.Name]:
    """The names a top-level statement reads from the module when it runs: not annotations,
    not assignment targets, not names bound by an enclosing def (parameters, locals)."""
    skipped = {id(node) for node in annotation_nodes(statement)}

    def visit(node: ast.AST, visible: frozenset[str], body_base: frozenset[str]) -> Iterator[
            ast.Name]:
        # visible: names local here; body_base: what a def nested here starts from (a class
        # body's own names are not visible inside its methods).
        if id(node) in skipped:
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            if node.id not in visible:
                yield node
            return
        if isinstance(node, ScopeNode):
            outer = [*getattr(node, "decorator_list", []), *getattr(node, "bases", []),
                     *getattr(node, "keywords", [])]
            if isinstance(node, FunctionNode):
                outer += [*node.args.defaults, *(d for d in node.args.kw_defaults if d)]
            for child in outer:
                yield from visit(child, visible, body_base)
            inner = body_base | bound_in(node)
            body = node.body if isinstance(node.body, list) else [node.body]
            for child in body:
                yield from visit(child, inner, body_base if isinstance(node, ast.ClassDef)
                                 else inner)
            return
        for child in ast.iter_child_nodes(node):
            yield from visit(child, visible, body_base)

    if isinstance(statement, (ast.Assign, ast.AnnAssign)):
        roots: list[ast.AST] = [statement.value] if statement.value is not None else []
    else:
        roots = [statement]
    for root in roots:
        yield from visit(root, frozenset(), frozenset())


def upward_references(source: str, path: str = "clawdspace.py") -> list[str]:
    """Uses, in running code, of a module-level name first defined in a later section."""
    tree = ast.parse(source)
    all_sections = sections(source)
    first_section: dict[str, int] = {}  # name -> index of the earliest section defining it
    for statement in tree.body:
        index = all_sections.index(owner(all_sections, statement.lineno))
        for name in defined_names(statement):
            first_section.setdefault(name, index)
    findings: set[tuple[int, str]] = set()
    for statement in tree.body:
        if not defined_names(statement):
            continue  # the `if __name__ == "__main__"` tail and the docstring run last anyway
        here = all_sections.index(owner(all_sections, statement.lineno))
        for node in free_loads(statement):
            there = first_section.get(node.id, -1)
            if there > here:
                user = defined_names(statement)[0]
                findings.add((node.lineno, f"{user} (section '{all_sections[here].title}') "
                              f"uses {node.id} of later section '{all_sections[there].title}'"))
    return [f"{path}:{line}: {finding}" for line, finding in sorted(findings)]


def engine_span(tree: ast.Module) -> range:
    """The lines of ``class Engine``."""
    engine = next(node for node in tree.body
                  if isinstance(node, ast.ClassDef) and node.name == "Engine")
    return range(engine.lineno, (engine.end_lineno or engine.lineno) + 1)


def api_uses_outside_engine(source: str, path: str = "clawdspace.py") -> list[str]:
    """``X.api`` anywhere but in the body of ``class Engine``."""
    tree = ast.parse(source)
    inside = engine_span(tree)
    lines = sorted(node.lineno for node in ast.walk(tree)
                   if isinstance(node, ast.Attribute) and node.attr == "api")
    return [f"{path}:{line}: .api outside class Engine" for line in lines if line not in inside]


def private_member_uses(source: str, path: str = "clawdspace.py") -> list[str]:
    """``x._url`` and the like, also as ``getattr(x, "_sock")``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_MEMBERS:
            found.append((node.lineno, node.attr))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in {"getattr", "setattr", "hasattr"} and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in PRIVATE_MEMBERS):
            found.append((node.lineno, str(node.args[1].value)))
    return [f"{path}:{line}: private member {name}" for line, name in sorted(found)]


def docker_references_outside_engine(source: str, path: str = "clawdspace.py") -> list[str]:
    """``docker.*`` (code or annotations) outside the section whose title starts with Docker.

    Reported by the metrics script, not asserted (yet)."""
    all_sections = sections(source)
    return [f"{path}:{node.lineno}: docker reference in '{owner(all_sections, node.lineno).title}'"
            for node in sorted((node for node in ast.walk(ast.parse(source))
                                if isinstance(node, ast.Name) and node.id == "docker"),
                               key=lambda node: node.lineno)
            if not owner(all_sections, node.lineno).title.startswith("Docker")]


def http_uses_outside_handlers(source: str, path: str = "clawdspace.py") -> list[str]:
    """``web.Request`` and friends, in code or annotations, outside the HTTP-facing sections."""
    tree = ast.parse(source)
    lines: set[int] = {node.lineno for node in ast.walk(tree)
                       if isinstance(node, ast.Attribute) and node.attr in HTTP_NAMES
                       and isinstance(node.value, ast.Name) and node.value.id == "web"}
    lines.update(node.lineno for annotation in annotation_nodes(tree)  # "web.Request"
                 for node in ast.walk(annotation) if isinstance(node, ast.Constant)
                 and isinstance(node.value, str) and HTTP_IN_TEXT.search(node.value))
    all_sections = sections(source)
    source_lines = source.splitlines()
    return [f"{path}:{line}: "
            f"{', '.join(m.group() for m in HTTP_IN_TEXT.finditer(source_lines[line - 1]))}"
            f" in section '{owner(all_sections, line).title}'"
            for line in sorted(lines)
            if not owner(all_sections, line).title.startswith(HTTP_SECTIONS)]


def label_spellings(source: str) -> Counter[str]:
    """Section title -> how many ``f"{LABEL}.`` it writes."""
    all_sections = sections(source)
    return Counter(owner(all_sections, number).title
                   for number, line in enumerate(source.splitlines(), start=1)
                   for _ in LABEL_SPELLING.finditer(line))


def suppress_exception_count(source: str) -> int:
    """``contextlib.suppress(Exception)`` (or ``suppress(..., Exception)``) calls."""
    return sum(1 for node in ast.walk(ast.parse(source))
               if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and node.func.attr == "suppress"
               and any(isinstance(arg, ast.Name) and arg.id == "Exception" for arg in node.args))


def read_source() -> str:
    return SOURCE_PATH.read_text(encoding="utf-8")


def test_no_section_calls_into_a_later_one() -> None:
    assert upward_references(read_source()) == []


def test_only_engine_speaks_to_docker_py() -> None:
    source = read_source()
    assert api_uses_outside_engine(source) + private_member_uses(source) == []


def test_only_handlers_speak_http() -> None:
    assert http_uses_outside_handlers(read_source()) == []


def test_labels_are_spelled_in_one_place() -> None:
    outside = {title: count for title, count in label_spellings(read_source()).items()
               if not title.startswith(LABEL_SECTIONS)}
    assert outside == {}


def report(path: Path) -> str:
    source = path.read_text(encoding="utf-8")
    name = path.name
    labels = label_spellings(source)
    labels_outside = sum(count for title, count in labels.items()
                         if not title.startswith(LABEL_SECTIONS))
    rows = [f"{section.last - section.first + 1:6d}  {section.title}"
            for section in sections(source)]
    findings = {
        "upward references": upward_references(source, name),
        ".api outside Engine": api_uses_outside_engine(source, name),
        "private docker-py/requests members": private_member_uses(source, name),
        "web.* outside HTTP sections": http_uses_outside_handlers(source, name),
        "docker references outside the engine section": docker_references_outside_engine(
            source, name),
    }
    out = [f"{path}: {len(source.splitlines())} lines, {len(rows)} sections", "", "lines  section",
           *rows, ""]
    out += [f"{title}: {len(items)}" for title, items in findings.items()]
    out += [f'f"{{LABEL}}. sites: {sum(labels.values())} ({labels_outside} outside '
            f"{', '.join(LABEL_SECTIONS)})",
            f"contextlib.suppress(Exception): {suppress_exception_count(source)}"]
    for title, items in findings.items():
        out += ["", f"== {title}", *items]
    out += ["", '== f"{LABEL}. sites per section',
            *(f"{count:4d}  {title}" for title, count in labels.items())]
    return "\n".join(out)


if __name__ == "__main__":
    print(report(Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE_PATH))
