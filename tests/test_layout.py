"""The repository's shape, as a newcomer reads it: the concept files of a LLaVA model and its commands at the top,
everything else in a named folder; no two modules import each other (through any import, `__main__` blocks and
function-level imports included), and every name imported from one is defined there; every Python file short
enough to read (<= 600 lines, <= 120 characters a line)."""

import ast
import subprocess

from conftest import ROOT

# model and its parts, the commands (infer, chat, serve, train, export), and what they directly need
TOP_LEVEL = {
    "model.py", "connector.py", "anyres.py", "data.py", "chat_template.py", "generate.py",  # the model and its inputs
    "infer.py", "chat.py", "serve.py", "batching.py",  # asking it: one answer, a conversation or a question file,
    # an HTTP server and its continuous batching
    "train.py", "recipes.py", "checkpoint.py", "metrics.py", "lora.py", "distributed.py",  # training it
    "convert.py", "export.py", "quantize.py", "tensor_parallel.py",  # reading, writing, shrinking and splitting it
}
FOLDERS = ("tools", "toy", "bench", "tests")


def python_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.split() if (ROOT / f).exists()]


def module_name(path: str) -> str:
    return path[:-3].replace("/", ".")


def imports(path: str, modules: set[str]) -> set[str]:
    """The repository modules `path` imports anywhere in its body (a folder's own modules also by their bare name)."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        folder = path.rsplit("/", 1)[0] if "/" in path else None
        for name in names:  # a script in a folder imports its neighbours by their bare name (bench/, tests/)
            for candidate in (name, f"{folder}.{name}" if folder else None):
                if candidate in modules:
                    found.add(candidate)
    found.discard(module_name(path))
    return found


def test_top_level_holds_only_the_concept_files():
    top = {f for f in python_files() if "/" not in f}
    assert top == TOP_LEVEL, f"unexpected: {sorted(top - TOP_LEVEL)}, missing: {sorted(TOP_LEVEL - top)}"
    assert {f.split("/")[0] for f in python_files() if "/" in f} <= set(FOLDERS)


def test_no_two_modules_import_each_other():
    files = python_files()
    modules = {module_name(f) for f in files}
    graph = {module_name(f): imports(f, modules) for f in files}
    cycles = []

    def visit(node, stack, on_stack, done):
        on_stack.add(node)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt in on_stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack, on_stack, done)
        stack.pop()
        on_stack.discard(node)
        done.add(node)

    done = set()
    for node in sorted(graph):
        if node not in done:
            visit(node, [], set(), done)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert "export" in graph["checkpoint"] and "convert" in graph["export"]  # the graph sees real imports


def top_level_names(path) -> set[str]:
    """What a module defines at its top level (guarded by an if or a try included): functions, classes, assignments
    and imports."""
    names, nodes = set(), list(ast.parse(path.read_text()).body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, (ast.If, ast.Try, ast.ExceptHandler)):
            nodes += node.body + getattr(node, "orelse", []) + getattr(node, "handlers", [])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def test_every_name_imported_from_a_repository_module_is_defined_there():
    """A name moved out of a module breaks the scripts that import it (bench/, tools/ run no test of their own)."""
    files = python_files()
    paths = {module_name(f): ROOT / f for f in files}
    missing = []
    for f in files:
        folder = f.rsplit("/", 1)[0] if "/" in f else None
        for node in ast.walk(ast.parse((ROOT / f).read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module):
                continue
            module = next((m for m in (node.module, f"{folder}.{node.module}" if folder else None) if m in paths),
                          None)
            if module is None:
                continue
            defined = top_level_names(paths[module])
            missing += [f"{f}:{node.lineno}: {a.name} from {module}" for a in node.names
                        if a.name != "*" and a.name not in defined and f"{module}.{a.name}" not in paths]
    assert not missing, missing


def test_every_file_reads_in_one_sitting():
    too_long, too_wide = [], []
    for f in python_files():
        lines = (ROOT / f).read_text().splitlines()
        if len(lines) > 600:
            too_long.append(f"{f} ({len(lines)} lines)")
        too_wide += [f"{f}:{i}" for i, line in enumerate(lines, 1) if len(line) > 120]
    assert not too_long, too_long
    assert not too_wide, f"{len(too_wide)} lines over 120 characters: {too_wide[:20]}"
