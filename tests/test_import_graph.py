"""The import graph of `epmoe`, built from every module's AST (imports inside functions included, since
they run too): no import circles between modules or between folders, and no arrow going up the layers.

The layers, lowest first (a module imports modules of its own layer or of lower ones, never higher):

  foundation   errors, version, registry, log, sizes, activations, layouts, placement, plan, state_dict,
               group: import nothing of epmoe but each other
  kernels      the Triton kernels and their launchers: know nothing of configs, plans or backends
  quant        the quantization schemes (they call the FP8 kernel; the kernels never call them)
  model        config, routing: the function a layer computes; balance: where its experts live (the
               placement for a load, logical experts in physical slots, moving them online)
  contract     the capability declarations and the pairing rules (contract), the build handshake
  roles        dispatch and experts: siblings that never import each other; what both need lives lower
               (the plan, the layouts)
  layer        make_dispatcher and MoELayer (where the config becomes a plan and parts), the float64 oracle
  commands     integration, testing, bench (with `epmoe tune`), the CLI and the package itself

A circle makes import order matter and hides which part depends on which; an arrow going up makes a low
part depend on what is built on it (a kernel on a benchmark, a dispatcher on an experts backend)."""
import ast
import pathlib

import epmoe

ROOT = pathlib.Path(epmoe.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the epmoe modules it imports (a name imported from a package counts as its submodule
    when that submodule exists, else as the package)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in files else origin for a in node.names]
            for t in targets:
                while t and t not in files:     # `import epmoe.x.y` of a name inside a module
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


LAYERS = [
    ("foundation", ["epmoe.errors", "epmoe.version", "epmoe.registry", "epmoe.log", "epmoe.sizes",
                    "epmoe.activations", "epmoe.layouts", "epmoe.placement", "epmoe.plan", "epmoe.state_dict",
                    "epmoe.group"]),
    ("kernels", ["epmoe.kernels"]),
    ("quant", ["epmoe.quant"]),
    ("model", ["epmoe.config", "epmoe.routing", "epmoe.balance"]),
    ("contract", ["epmoe.contract", "epmoe.handshake"]),
    ("roles", ["epmoe.dispatch", "epmoe.experts"]),
    ("layer", ["epmoe.build", "epmoe.layer", "epmoe.reference"]),
    ("commands", ["epmoe.integration", "epmoe.testing", "epmoe.bench", "epmoe.usage", "epmoe.info",
                  "epmoe.presets", "epmoe.main_job", "epmoe.cli", "epmoe.__main__", "epmoe"]),
]
SIBLINGS = [("epmoe.dispatch", "epmoe.experts")]     # the same layer, and neither imports the other


def unit_of(module: str) -> str:
    """The folder or top-level module `module` belongs to (the longest unit named in LAYERS)."""
    units = [u for _, us in LAYERS for u in us if module == u or module.startswith(u + ".")]
    if not units:
        raise KeyError(module)
    return max(units, key=len)


def layer_of(module: str) -> int:
    unit = unit_of(module)
    return next(i for i, (_, us) in enumerate(LAYERS) if unit in us)


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph collapsed onto units (folders and top-level modules), self-loops dropped."""
    out: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        out.setdefault(unit_of(mod), set()).update(unit_of(t) for t in targets if unit_of(t) != unit_of(mod))
    for targets in list(out.values()):
        for t in targets:
            out.setdefault(t, set())
    return out


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every arrow going up a layer, or between siblings."""
    bad = []
    for mod, targets in sorted(graph.items()):
        for t in sorted(targets):
            if layer_of(t) > layer_of(mod):
                bad.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})")
            pair = {unit_of(mod), unit_of(t)}
            if any(pair == set(s) for s in SIBLINGS):
                bad.append(f"{mod} imports its sibling {t}")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "epmoe.contract" in graph["epmoe.layer"]
    assert "epmoe.kernels.batched_moe" in graph["epmoe.experts.batched"]      # imported inside a method


def test_a_planted_circle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles_in_epmoe():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_module_has_a_layer():
    missing = []
    for mod in import_graph():
        try:
            layer_of(mod)
        except KeyError:
            missing.append(mod)
    assert not missing, f"modules in no layer of LAYERS (place them): {missing}"


def test_planted_arrows_up_and_between_siblings_are_found():
    graph = {"epmoe.kernels.tune": {"epmoe.bench.gpu_timing"}, "epmoe.bench.gpu_timing": set(),
             "epmoe.dispatch.alltoall": {"epmoe.experts.base", "epmoe.layouts"}, "epmoe.experts.base": set(),
             "epmoe.layouts": set()}
    assert violations(graph) == ["epmoe.dispatch.alltoall imports its sibling epmoe.experts.base",
                                 "epmoe.kernels.tune (kernels) imports epmoe.bench.gpu_timing (commands)"]


def test_no_arrow_goes_up_the_layers():
    found = violations(import_graph())
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_no_folder_loops():
    found = cycles(unit_graph(import_graph()))
    assert not found, "folder loops: " + "; ".join(" <-> ".join(c) for c in found)
