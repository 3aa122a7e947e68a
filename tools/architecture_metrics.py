"""Architecture metrics of the ``diffusers_attn`` package, read from source (nothing is imported).

Prints: import cycles among the package's own modules (module-level and function-level imports both count),
the number of function-level imports of the package's own modules, the largest modules and the longest
functions, and the layer violations (a lower layer importing a higher one). ``--json OUT`` writes the same.

    python tools/architecture_metrics.py [--json OUT]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "diffusers_attn"

#: Layers from the bottom up; a module may import its own layer and the ones below, never above. Modules not
#: listed (cli, demo, eval, compare, generate, reference models, ...) sit on top and may import anything.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("env", ("diffusers_attn._env",)),
    ("kernels", ("diffusers_attn.kernels",)),
    ("core", ("diffusers_attn.layout", "diffusers_attn.stats")),
    ("methods", ("diffusers_attn.methods",)),
    ("adapters", ("diffusers_attn.adapters",)),
    ("install", ("diffusers_attn.install", "diffusers_attn.context", "diffusers_attn.parallel",
                 "diffusers_attn.ops", "diffusers_attn.api")),
]
#: Pipelines for models diffusers lacks: beside the stack, and they never call into a method.
PIPELINES = "diffusers_attn.pipelines"
#: Deferred on purpose (heavy optional dependencies): not counted among "function-level own imports".
HEAVY_OPTIONAL = ("gradio", "triton", "vbench")


@dataclass
class ModuleInfo:
    name: str
    path: Path
    lines: int
    imports: list[tuple[str, bool]] = field(default_factory=list)  # (target module, at function level)
    functions: list[tuple[str, int, int]] = field(default_factory=list)  # (qualified name, first line, length)
    jit_kernels: set[str] = field(default_factory=set)  # qualified names of @triton.jit functions


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_pkg: bool, node: ast.ImportFrom | ast.Import, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
        return [n for n in (_longest_known(n, known) for n in names) if n]
    base_parts = current.split(".") if is_pkg else current.split(".")[:-1]
    if node.level:
        base_parts = base_parts[: len(base_parts) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in known:
            out.append(sub)
        else:
            hit = _longest_known(base, known)
            if hit:
                out.append(hit)
    return out


def _longest_known(name: str, known: set[str]) -> str | None:
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in known:
            return cand
        parts.pop()
    return None


class _Visitor(ast.NodeVisitor):
    def __init__(self, info: ModuleInfo, known: set[str], is_pkg: bool) -> None:
        self.info, self.known, self.is_pkg = info, known, is_pkg
        self.depth = 0
        self.type_checking = 0
        self.stack: list[str] = []

    def _imp(self, node) -> None:
        if self.type_checking:
            return
        for target in _resolve(self.info.name, self.is_pkg, node, self.known):
            if target != self.info.name:
                self.info.imports.append((target, self.depth > 0))

    visit_Import = _imp
    visit_ImportFrom = _imp

    def visit_If(self, node: ast.If) -> None:
        test = ast.unparse(node.test)
        if "TYPE_CHECKING" in test:
            self.type_checking += 1
            for n in node.body:
                self.visit(n)
            self.type_checking -= 1
            for n in node.orelse:
                self.visit(n)
        else:
            self.generic_visit(node)

    def _func(self, node) -> None:
        qual = ".".join(self.stack + [node.name])
        length = (node.end_lineno or node.lineno) - node.lineno + 1
        self.info.functions.append((qual, node.lineno, length))
        if any(ast.unparse(d).split("(")[0] in ("triton.jit", "jit") for d in node.decorator_list):
            self.info.jit_kernels.add(qual)
        self.stack.append(node.name)
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1
        self.stack.pop()

    visit_FunctionDef = _func
    visit_AsyncFunctionDef = _func

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()


def collect(root: Path = ROOT) -> dict[str, ModuleInfo]:
    files = sorted((root / PACKAGE).rglob("*.py"))
    known = {_module_name(p) for p in files}
    mods = {}
    for p in files:
        name = _module_name(p)
        src = p.read_text()
        info = ModuleInfo(name, p, len(src.splitlines()))
        _Visitor(info, known, p.name == "__init__.py").visit(ast.parse(src))
        mods[name] = info
    return mods


def cycles(mods: dict[str, ModuleInfo]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph = {m: sorted({t for t, _ in info.imports}) for m, info in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def _layer_of(module: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def layer_violations(mods: dict[str, ModuleInfo]) -> list[str]:
    out = []
    for m, info in mods.items():
        lm = _layer_of(m)
        in_pipelines = m.startswith(PIPELINES)
        for t, _ in info.imports:
            lt = _layer_of(t)
            if lm is not None and lt is not None and lt > lm:
                out.append(f"{m} ({LAYERS[lm][0]}) imports {t} ({LAYERS[lt][0]})")
            elif in_pipelines and lt is not None and LAYERS[lt][0] in ("methods", "adapters", "install"):
                out.append(f"{m} (pipelines) imports {t} ({LAYERS[lt][0]})")
            elif lm is not None and t.startswith(PIPELINES) and LAYERS[lm][0] in ("kernels", "core", "methods"):
                out.append(f"{m} ({LAYERS[lm][0]}) imports {t} (pipelines)")
    return sorted(out)


def function_level_own_imports(mods: dict[str, ModuleInfo]) -> int:
    return sum(1 for info in mods.values() for t, fn in info.imports if fn)


def metrics(root: Path = ROOT) -> dict:
    mods = collect(root)
    funcs = [
        (f"{info.name}.{q}", n) for info in mods.values() for q, _, n in info.functions
        # a pipeline's __call__ is long as in diffusers; a fused GPU kernel is one @triton.jit function by design
        if not (info.name.startswith(PIPELINES) and q.endswith("__call__")) and q not in info.jit_kernels
    ]
    funcs.sort(key=lambda x: -x[1])
    largest = sorted(((i.name, i.lines) for i in mods.values()), key=lambda x: -x[1])
    return {
        "modules": len(mods),
        "cycles": cycles(mods),
        "function_level_own_imports": function_level_own_imports(mods),
        "largest_modules": largest[:8],
        "longest_functions": funcs[:8],
        "layer_violations": layer_violations(mods),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the metrics as JSON to this path")
    args = ap.parse_args(argv)
    m = metrics()
    print(f"modules: {m['modules']}")
    print(f"import cycles: {len(m['cycles'])}")
    for c in m["cycles"]:
        print("  " + " <-> ".join(c))
    print(f"function-level imports of the package's own modules: {m['function_level_own_imports']}")
    print("largest modules:")
    for n, lines in m["largest_modules"]:
        print(f"  {lines:5d}  {n}")
    print("longest functions (a pipeline's __call__ and @triton.jit kernels aside):")
    for n, lines in m["longest_functions"]:
        print(f"  {lines:5d}  {n}")
    print(f"layer violations: {len(m['layer_violations'])}")
    for v in m["layer_violations"]:
        print("  " + v)
    if args.json:
        Path(args.json).write_text(json.dumps(m, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
