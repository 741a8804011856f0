"""The test suite pins the CPU wherever it trains: a static check of every .py file under tests/.

`train.device` defaults to `auto` (= CUDA when available), and init_parallel's device_kind too.
On a GPU machine an unpinned world-2 gloo test would try NCCL on two ranks of one GPU, and CPU
fp32 reference numbers would be compared with bf16-autocast CUDA ones. So, unless a test is
marked @pytest.mark.gpu:

  cli     a unit that starts a training process ("moetrain.train" / "moetrain-train", a launch/
          script, or, as an element of a command list, a tools/ script that trains with the
          config's device: found by reading tools/) must pass "train.device=cpu";
  flag    a command list running a tools/ script whose --device defaults to anything but cpu
          must pass "--device", "cpu";
  inproc  a unit that calls build_trainer / build_run / run_training must hand it an explicit device:
          init_parallel(..., "cpu") (or a Parallel(..., torch.device("cpu"|"meta")));
  and every init_parallel call passes the device "cpu" (5th positional or device_kind=).

A unit is a module-level function, method or statement (nested functions belong to their unit).
A pin counts when it is in the unit or in a tests/ name the unit uses (a shared override list such
as ckpt_helpers.TINY, a helper such as _launch.tiny_overrides), followed through imports. A helper
that launches without a pin of its own (ckpt_helpers.start_cli(args)) hands the duty to every unit
that uses it. test_checker_* below show the check failing on each kind of unpinned source.
"""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

CLI_PIN = "train.device=cpu"
LAUNCH_MODULES = {"moetrain.train", "moetrain-train"}
INPROC_CALLS = {"build_trainer", "build_run", "run_training"}
EXPLICIT_DEVICES = {"cpu", "meta"}


# --------------------------------------------------------------------------- the tools

def classify_tools(tools_dir: Path = REPO / "tools") -> dict[str, str]:
    """{script file name: pin kind} for tools/*.py that pick a device a test must pin:
    "cli" when the tool trains with the config's train.device (it reads cfg.train.device, or
    starts `-m moetrain.train`) and takes config overrides from its command line (positional
    `overrides` or --set); "flag" when it has a --device option whose default is not cpu. Tools
    that train but choose the device themselves (gpu_check.py: the GPU, or the CPU with
    --dry-run) or only on the CPU (bench_memory.py) are not listed."""
    kinds = {}
    for path in sorted(tools_dir.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(), str(path))
        except (SyntaxError, UnicodeDecodeError):
            continue
        config_device = takes_overrides = device_flag = False
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and n.attr == "device" and isinstance(n.value, ast.Attribute) \
                    and n.value.attr == "train":
                config_device = True
            elif isinstance(n, ast.Constant) and n.value in LAUNCH_MODULES:
                config_device = True
            elif isinstance(n, ast.Call) and _name(n.func) == "add_argument" and n.args \
                    and isinstance(n.args[0], ast.Constant):
                if n.args[0].value in ("overrides", "--set"):
                    takes_overrides = True
                elif n.args[0].value == "--device":
                    default = next((k.value for k in n.keywords if k.arg == "default"), None)
                    device_flag = not (isinstance(default, ast.Constant) and default.value == "cpu")
        if device_flag:
            kinds[path.name] = "flag"
        elif config_device and takes_overrides:
            kinds[path.name] = "cli"
    return kinds


def launch_scripts(launch_dir: Path = REPO / "launch") -> set[str]:
    return {p.name for p in launch_dir.iterdir() if p.is_file() and not p.name.startswith("_")}


def cli_wrappers(tree: dict[str, str]) -> set[str]:
    """File names of tests/ scripts that run the CLI (moetrain.train.cli) with a test hook, e.g.
    checkpoint/_faulty_main.py: naming one in a command launches training like the CLI."""
    return {Path(rel).name for rel, src in tree.items() if Path(rel).name.startswith("_")
            and ("from moetrain.train.cli import" in src or "from moetrain.train import cli" in src)}


# --------------------------------------------------------------------------- the checker

def _name(func: ast.AST) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _walk(node: ast.AST):
    """ast.walk without docstrings (bare string statements): prose never pins or launches."""
    todo = [node]
    while todo:
        n = todo.pop()
        if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str):
            continue
        yield n
        todo.extend(ast.iter_child_nodes(n))


def _is_gpu_mark(expr: ast.AST) -> bool:
    """pytest.mark.gpu, also called or inside a list (pytestmark = [...])."""
    return any(isinstance(n, ast.Attribute) and n.attr == "gpu" and _name(n.value) == "mark" for n in ast.walk(expr))


@dataclass
class Unit:
    module: "Module"
    label: str
    node: ast.AST
    symbols: tuple[str, ...] = ()        # the module-level names it defines
    gpu: bool = False
    kinds: set[str] = field(default_factory=set)


@dataclass
class Module:
    rel: str
    tree: ast.Module
    defs: dict[str, list[ast.AST]] = field(default_factory=dict)
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)   # name -> (module, attr)
    units: list[Unit] = field(default_factory=list)


class Checker:
    def __init__(self, sources: dict[str, str], tools: dict[str, str], scripts: set[str]):
        self.tools, self.scripts = tools, scripts
        self.modules = {rel: self._module(rel, src) for rel, src in sorted(sources.items())}
        self._memo: dict = {}

    # ---- indexing
    def _module(self, rel: str, src: str) -> Module:
        m = Module(rel, ast.parse(src, rel))
        gpu_module = False
        for n in ast.walk(m.tree):
            if isinstance(n, ast.Import):
                for a in n.names:
                    m.imports[a.asname or a.name.split(".")[0]] = (a.name if a.asname else a.name.split(".")[0], None)
            elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
                for a in n.names:
                    m.imports[a.asname or a.name] = (n.module, a.name)
        for stmt in m.tree.body:
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                                    for t in stmt.targets):
                gpu_module = _is_gpu_mark(stmt.value)
        for stmt in m.tree.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                m.defs.setdefault(stmt.name, []).append(stmt)
                gpu = gpu_module or any(_is_gpu_mark(d) for d in stmt.decorator_list)
                m.units.append(Unit(m, stmt.name, stmt, (stmt.name,), gpu))
            elif isinstance(stmt, ast.ClassDef):
                m.defs.setdefault(stmt.name, []).append(stmt)
                cls_gpu = gpu_module or any(_is_gpu_mark(d) for d in stmt.decorator_list)
                for sub in stmt.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        gpu = cls_gpu or any(_is_gpu_mark(d) for d in sub.decorator_list)
                        m.units.append(Unit(m, f"{stmt.name}.{sub.name}", sub, (stmt.name,), gpu))
            else:
                names = ()
                if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                    names = tuple(t.id for t in targets if isinstance(t, ast.Name))
                    for name in names:
                        if stmt.value is not None:
                            m.defs.setdefault(name, []).append(stmt.value)
                m.units.append(Unit(m, names[0] if names else f"<module line {stmt.lineno}>", stmt, names, gpu_module))
        return m

    def _find_module(self, name: str, near: Module) -> Module | None:
        """A tests/ module imported as `name` (tests/ and each test directory are on sys.path;
        dotted names are packages such as moetrain, never tests/ files)."""
        if "." in name:
            return None
        hits = [m for rel, m in self.modules.items() if Path(rel).stem == name]
        same_dir = [m for m in hits if Path(m.rel).parent == Path(near.rel).parent]
        return (same_dir or hits or [None])[0]

    def resolve(self, module: Module, node: ast.AST) -> tuple[Module, str] | None:
        """The tests/ symbol a Name or module.attr refers to (None: local, builtin or not in tests/)."""
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            if node.id in module.defs:
                return module, node.id
            if node.id in module.imports:
                mod_name, attr = module.imports[node.id]
                target = self._find_module(mod_name, module)
                if target is not None and attr is not None and attr in target.defs:
                    return target, attr
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module.imports:
            mod_name, attr = module.imports[node.value.id]
            if attr is None:
                target = self._find_module(mod_name, module)
                if target is not None and node.attr in target.defs:
                    return target, node.attr
        return None

    def references(self, unit: Unit) -> set[tuple[str, str]]:
        out = set()
        for n in _walk(unit.node):
            hit = self.resolve(unit.module, n)
            if hit is not None and not (hit[0] is unit.module and hit[1] in unit.symbols):
                out.add((hit[0].rel, hit[1]))
        return out

    # ---- what a unit does
    def _tool_in(self, module: Module, expr: ast.AST, depth: int = 0) -> set[str]:
        """Pin kinds of the tools/ scripts an expression names (through module-level assignments)."""
        kinds = set()
        for n in _walk(expr):
            if isinstance(n, ast.Constant) and isinstance(n.value, str):
                base = n.value.rstrip("/").rsplit("/", 1)[-1]
                if base in self.tools:
                    kinds.add(self.tools[base])
            elif depth < 3 and isinstance(n, ast.Name):
                hit = self.resolve(module, n)
                if hit is not None:
                    for value in hit[0].defs[hit[1]]:
                        if not isinstance(value, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                            kinds |= self._tool_in(hit[0], value, depth + 1)
        return kinds

    def direct_kinds(self, unit: Unit) -> set[str]:
        kinds = set()
        for n in _walk(unit.node):
            if isinstance(n, ast.Constant) and isinstance(n.value, str):
                words = n.value.split()
                if n.value in LAUNCH_MODULES or any(w.rsplit("/", 1)[-1] in self.scripts for w in words):
                    kinds.add("cli")
            elif isinstance(n, (ast.List, ast.Tuple)):
                for elt in n.elts:
                    kinds |= self._tool_in(unit.module, elt)
            elif isinstance(n, ast.Call) and _name(n.func) in INPROC_CALLS:
                kinds.add("inproc")
        return kinds

    @staticmethod
    def _device_arg(call: ast.Call, position: int, keyword: str):
        for k in call.keywords:
            if k.arg == keyword:
                return k.value
        if len(call.args) > position and not any(isinstance(a, ast.Starred) for a in call.args[:position + 1]):
            return call.args[position]
        return None

    @classmethod
    def init_parallel_cpu(cls, call: ast.Call) -> bool:
        dev = cls._device_arg(call, 4, "device_kind")
        return isinstance(dev, ast.Constant) and dev.value == "cpu"

    @classmethod
    def explicit_parallel(cls, call: ast.Call) -> bool:
        """Parallel(dims, rank, torch.device("cpu" | "meta"), ...)"""
        dev = cls._device_arg(call, 2, "device")
        return isinstance(dev, ast.Call) and _name(dev.func) == "device" and bool(dev.args) \
            and isinstance(dev.args[0], ast.Constant) and dev.args[0].value in EXPLICIT_DEVICES

    def _pins_here(self, kind: str, n: ast.AST) -> bool:
        if kind == "cli":
            return isinstance(n, ast.Constant) and isinstance(n.value, str) and CLI_PIN in n.value.split()
        if kind == "flag":
            if isinstance(n, ast.Constant) and n.value == "--device=cpu":
                return True
            if isinstance(n, (ast.List, ast.Tuple)):
                vals = [e.value if isinstance(e, ast.Constant) else None for e in n.elts]
                return any(a == "--device" and b == "cpu" for a, b in zip(vals, vals[1:]))
            return False
        if isinstance(n, ast.Call):       # inproc
            return (_name(n.func) == "init_parallel" and self.init_parallel_cpu(n)) or \
                (_name(n.func) == "Parallel" and self.explicit_parallel(n))
        return False

    def unit_pinned(self, kind: str, unit: Unit) -> bool:
        key = (kind, "unit", id(unit))
        if key not in self._memo:
            self._memo[key] = self.pinned(kind, unit.module, [unit.node])
        return self._memo[key]

    def pinned(self, kind: str, module: Module, nodes: list[ast.AST], stack: frozenset = frozenset()) -> bool:
        for node in nodes:
            for n in _walk(node):
                if self._pins_here(kind, n):
                    return True
                hit = self.resolve(module, n)
                if hit is not None and (hit[0].rel, hit[1]) not in stack:
                    key = (kind, hit[0].rel, hit[1])
                    if key not in self._memo:
                        self._memo[key] = self.pinned(kind, hit[0], hit[0].defs[hit[1]],
                                                      stack | {(hit[0].rel, hit[1])})
                    if self._memo[key]:
                        return True
        return False

    # ---- the verdict
    def run(self) -> tuple[list[str], list[Unit]]:
        """(violations, launching units)."""
        units = [u for m in self.modules.values() for u in m.units if not u.gpu]
        refs = {id(u): self.references(u) for u in units}
        for u in units:
            u.kinds = self.direct_kinds(u)
        helpers: dict[tuple[str, str], set[str]] = {}
        changed = True
        while changed:      # unpinned launching helpers hand their duty to the units using them
            changed = False
            for u in units:
                for ref in refs[id(u)]:
                    extra = helpers.get(ref, set()) - u.kinds
                    if extra:
                        u.kinds |= extra
                        changed = True
                for kind in u.kinds:
                    if u.symbols and not self.unit_pinned(kind, u):
                        for s in u.symbols:
                            if kind not in helpers.setdefault((u.module.rel, s), set()):
                                helpers[(u.module.rel, s)].add(kind)
                                changed = True
        used = set().union(*refs.values()) if refs else set()
        violations = []
        for u in units:
            for kind in sorted(u.kinds):
                is_helper = any((u.module.rel, s) in used for s in u.symbols)
                if not is_helper and not self.unit_pinned(kind, u):
                    need = {"cli": f'"{CLI_PIN}"', "flag": '"--device", "cpu"',
                            "inproc": 'init_parallel(..., "cpu")'}[kind]
                    violations.append(f"{u.module.rel}: {u.label} ({kind}) launches training without {need}")
            for n in _walk(u.node):
                if isinstance(n, ast.Call) and _name(n.func) == "init_parallel" and not self.init_parallel_cpu(n):
                    violations.append(f"{u.module.rel}:{n.lineno}: {u.label}: init_parallel without the device \"cpu\"")
        return violations, [u for u in units if u.kinds]


def read_tests_tree() -> dict[str, str]:
    me = Path(__file__).resolve()
    return {str(p.relative_to(TESTS)): p.read_text() for p in sorted(TESTS.rglob("*.py"))
            if p.resolve() != me and "__pycache__" not in p.parts}


# --------------------------------------------------------------------------- the suite

def test_every_training_test_pins_the_cpu():
    tree = read_tests_tree()
    violations, launching = Checker(tree, classify_tools(), launch_scripts() | cli_wrappers(tree)).run()
    assert violations == [], "pin the CPU (see this file's docstring):\n" + "\n".join(violations)
    # the check sees the suite's launches: it cannot pass by finding nothing
    by_kind = {k: {f"{u.module.rel}:{u.label}" for u in launching if k in u.kinds} for k in ("cli", "flag", "inproc")}
    assert len(by_kind["cli"]) >= 10 and len(by_kind["inproc"]) >= 10, by_kind
    for expected in ("launch/test_torchrun_launch.py:test_single_node_torchrun",
                     "checkpoint/test_checkpoint_fault.py:test_killed_rank_restarts_and_finishes_identically",
                     "checkpoint/test_preemption.py:start",
                     "tools/test_profile_and_report.py:test_two_rank_profile",
                     "tools/test_compare_routers.py:_run",
                     "checkpoint/ckpt_helpers.py:train"):
        assert any(expected in names for names in by_kind.values()), expected


def test_tools_are_classified():
    tools = classify_tools()
    assert tools.get("profile_step.py") == "cli" and tools.get("compare_routers.py") == "cli"
    if "a2a_bench.py" in tools:          # --device defaults to auto today
        assert tools["a2a_bench.py"] == "flag"
    # CPU-only, no training, or the device chosen by the tool itself (gpu_check: GPU, or CPU with --dry-run)
    assert not {"bench_memory.py", "ckpt_inspect.py", "upcycle.py", "gpu_check.py"} & set(tools)
    assert {"torchrun.sh", "mpirun.sh", "slurm.sbatch"} <= launch_scripts()


# --------------------------------------------------------------------------- the checker can fail

TOOLS = {"profile_step.py": "cli", "a2a_bench.py": "flag"}
SCRIPTS = {"torchrun.sh", "mpirun.sh", "slurm.sbatch"}


def _violations(**files: str) -> list[str]:
    return Checker({f"{k}.py": textwrap.dedent(v) for k, v in files.items()}, TOOLS, SCRIPTS).run()[0]


HELPERS = """
    import subprocess, sys
    TINY = ["model.dim=32", "train.device=cpu"]
    BARE = ["model.dim=32"]
    def overrides(tmp):
        return TINY + [f"logging.dir={tmp}"]
    def start_cli(args):
        return subprocess.Popen([sys.executable, "-m", "moetrain.train", *args])
"""


@pytest.mark.parametrize("body, kind", [
    ('subprocess.run([sys.executable, "-m", "moetrain.train", "model.dim=32"])', "cli"),
    ('subprocess.run(["bash", "launch/torchrun.sh", "--nproc-per-node", "2", *H.BARE])', "cli"),
    ('script.write_text("bash launch/mpirun.sh -n 2")', "cli"),
    ('H.start_cli(H.BARE)', "cli"),                                       # helper without a pin: caller's duty
    ('subprocess.run([sys.executable, str(TOOLS / "profile_step.py"), "--world", "2"])', "cli"),
    ('subprocess.run([sys.executable, str(SCRIPT), "--world", "2"])', "flag"),
    ('subprocess.run([sys.executable, str(SCRIPT), "--device", "auto"])', "flag"),
    ('run_training(cfg, init_parallel(1, 1, 1, env), data)', "inproc"),
    ('build_trainer(cfg, Parallel(dims, 0, torch.device("cuda")), data)', "inproc"),
])
def test_checker_flags_unpinned(body, kind):
    test = f"""
        import subprocess, sys
        import helpers as H
        from pathlib import Path
        TOOLS = Path("tools")
        SCRIPT = TOOLS / "a2a_bench.py"
        def test_it(cfg, env, data, dims, script):
            {body}
    """
    found = _violations(helpers=HELPERS, test_x=test)
    assert any(f"test_it ({kind})" in v for v in found), found


@pytest.mark.parametrize("body", [
    'subprocess.run([sys.executable, "-m", "moetrain.train", "model.dim=32", "train.device=cpu"])',
    'subprocess.run(["bash", "launch/torchrun.sh", "--nproc-per-node", "2", *H.overrides(tmp)])',
    'H.start_cli(H.overrides(tmp))',
    'subprocess.run([sys.executable, str(TOOLS / "profile_step.py"), *H.TINY])',
    'subprocess.run([sys.executable, str(SCRIPT), "--world", "2", "--device", "cpu"])',
    'run_training(cfg, init_parallel(1, 1, 1, env, "cpu"), data)',
    'build_trainer(cfg, init_parallel(1, 1, 1, env, device_kind="cpu"), data)',
    'build_trainer(cfg, Parallel(dims, 0, torch.device("meta")), data)',
    'spec_from_file_location("a2a_bench", SCRIPT)',                      # importing a tool is no launch
])
def test_checker_accepts_pinned(body):
    test = f"""
        import subprocess, sys
        import helpers as H
        from pathlib import Path
        TOOLS = Path("tools")
        SCRIPT = TOOLS / "a2a_bench.py"
        def test_it(cfg, env, data, dims, tmp):
            {body}
        def test_other(tmp):
            H.start_cli(H.overrides(tmp))
    """
    assert _violations(helpers=HELPERS, test_x=test) == []


def test_checker_flags_init_parallel_without_cpu_and_exempts_gpu_tests():
    found = _violations(test_x="""
        import pytest
        def body(rank, world):
            par = init_parallel(1, 1, 1, env, "auto")
        @pytest.mark.gpu
        def test_on_cuda():
            run_training(cfg, init_parallel(1, 1, 1, env, "cuda"), data)
    """)
    assert len(found) == 1 and "body" in found[0] and "init_parallel without" in found[0], found


def test_checker_follows_shared_lists_and_one_unpinned_caller_fails():
    """A pin in a shared override list counts for every user; one caller of an unpinned helper
    that passes bare overrides is enough to fail."""
    helpers = """
        import subprocess, sys
        from shared import TINY
        def start(args):
            return subprocess.Popen([sys.executable, "-m", "moetrain.train", *args])
    """
    shared = 'TINY = ["model.dim=32", "train.device=cpu"]\nBARE = ["model.dim=32"]\n'
    good = "from helpers import start\nfrom shared import TINY\ndef test_a():\n    start(TINY)\n"
    bad = "from helpers import start\nfrom shared import BARE\ndef test_b():\n    start(BARE)\n"
    assert _violations(helpers=helpers, shared=shared, test_good=good) == []
    found = _violations(helpers=helpers, shared=shared, test_good=good, test_bad=bad)
    assert len(found) == 1 and "test_bad.py: test_b (cli)" in found[0], found
