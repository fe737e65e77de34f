"""No blocking call on an event loop in ``deployments/``: a lint over the source.

An ingress or stage replica runs everything on one asyncio loop: a DNS lookup, an S3
request, a file read or a GPU-to-CPU copy made there stalls every job of the replica (and
newer Ray health checks mark a replica whose loop is blocked as unhealthy). Blocking work
belongs in ``asyncio.to_thread`` (a function handed to it is not called on the loop).

For every ``async def`` in ``deployments/`` this walks what runs on the loop: its own
calls, and the synchronous functions of the same module it calls (methods through
``self``, module functions by name, and ``self.attr`` set to a lambda), transitively. A
call is blocking when it is one of :data:`BLOCKING_CALLS`, a method of
:data:`BLOCKING_METHODS`, or a store/record I/O method (:data:`STORE_METHODS`) on a
receiver that names a store. A line that must block anyway says why with a
``# blocking-ok: <reason>`` comment. Each module is its own case, so a finding names it.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p for p in (ROOT / "deployments").rglob("*.py"))

# Calls that block, by the dotted name they are called by.
BLOCKING_CALLS = {
    "time.sleep", "open", "input",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.create_connection",
    "subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call", "subprocess.check_output",
    "os.system", "os.read", "os.write", "shutil.copyfile", "shutil.copyfileobj", "shutil.rmtree",
    "urllib.request.urlopen", "ray.get", "ray.wait", "ray.put", "to_cpu", "load_replica_stage",
    "resolve_models_root",
}
BLOCKING_PREFIXES = ("requests.", "boto3.", "http.client.", "urllib3.")
# Methods that block whatever they are called on: tensor copies off a device, file I/O.
BLOCKING_METHODS = {"cpu", "numpy", "item", "synchronize", "read_bytes", "write_bytes", "read_text", "write_text"}
# The stores' and job records' I/O (deployments/storage.py, jobs.py), on a receiver naming a store.
STORE_METHODS = {"get", "put", "put_file", "exists", "size", "create", "list", "delete", "stream", "presigned_url",
                 "get_external", "exists_external", "size_external", "save", "claim", "orphans", "recent",
                 "request_cancel", "cancel_requested", "superseded", "list_ids", "fetch_inputs", "save_upload"}
STORE_RECEIVER = re.compile(r"(^|[._])(store|jobs|target|s3|client|admission)$|output_store\(", re.IGNORECASE)
ALLOW = re.compile(r"#\s*blocking-ok:\s*\S")


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return f"{dotted(node.func)}()"
    return "?"


def calls_in(body: list[ast.stmt]) -> list[ast.Call]:
    """The calls made in ``body`` itself (nested functions and lambdas are other scopes)."""
    found, stack = [], list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Call):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def blocking(call: ast.Call) -> str | None:
    name = dotted(call.func)
    if name in BLOCKING_CALLS or name.startswith(BLOCKING_PREFIXES):
        return name
    if isinstance(call.func, ast.Attribute):
        method, receiver = call.func.attr, dotted(call.func.value)
        if method in BLOCKING_METHODS:
            return f"{receiver}.{method}"
        if method in STORE_METHODS and STORE_RECEIVER.search(receiver):
            return f"{receiver}.{method}"
    return None


class Module:
    """One module's functions (``name``, ``Class.name``) and ``self`` attributes bound to lambdas."""

    def __init__(self, path: Path):
        self.path, self.source = path, path.read_text()
        self.lines = self.source.splitlines()
        self.functions: dict[str, ast.AST] = {}
        self.lambdas: dict[str, list[ast.Lambda]] = {}
        for node in ast.parse(self.source).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions[node.name] = node
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        self.functions[f"{node.name}.{item.name}"] = item
                        self._lambdas_of(node.name, item)

    def _lambdas_of(self, cls: str, method: ast.AST) -> None:
        for node in ast.walk(method):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and dotted(target.value) == "self":
                        found = [n for n in ast.walk(node.value) if isinstance(n, ast.Lambda)]
                        self.lambdas.setdefault(f"{cls}.{target.attr}", []).extend(found)

    def allowed(self, node: ast.AST) -> bool:
        return bool(ALLOW.search(self.lines[node.lineno - 1]))

    def callee(self, call: ast.Call, cls: str | None) -> list[list[ast.stmt]]:
        """The bodies a call runs, when they are this module's sync code."""
        name = dotted(call.func)
        target = None
        if name.startswith("self.") and cls and name.count(".") == 1:
            target = f"{cls}.{name[5:]}"
            if target in self.lambdas:
                return [[ast.Expr(value=lam.body)] for lam in self.lambdas[target]]
        elif "." not in name:
            target = name
        elif name.count(".") == 1 and name.split(".")[0] in {c.split(".")[0] for c in self.functions}:
            target = name  # Class.method(self, ...)
        node = self.functions.get(target or "")
        return [node.body] if isinstance(node, ast.FunctionDef) else []

    def findings(self) -> list[str]:
        out = []
        for qualname, node in self.functions.items():
            if not isinstance(node, ast.AsyncFunctionDef):
                continue
            cls = qualname.split(".")[0] if "." in qualname else None
            seen, stack = set(), [(node.body, qualname)]
            while stack:
                body, via = stack.pop()
                for call in calls_in(body):
                    if self.allowed(call):
                        continue
                    what = blocking(call)
                    if what is not None:
                        out.append(f"{self.path.relative_to(ROOT)}:{call.lineno} {what} on the loop in {via}")
                        continue
                    for inner in self.callee(call, cls):
                        if id(inner) not in seen:
                            seen.add(id(inner))
                            stack.append((inner, f"{via} -> {dotted(call.func)}"))
        return sorted(set(out))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_blocking_call_on_the_event_loop(path):
    assert Module(path).findings() == []


def test_the_lint_catches_what_it_looks_for(tmp_path):
    """Each kind of blocking call, directly and through sync helpers, is found; the same work
    handed to a worker thread, or marked, is not."""
    source = '''
import asyncio, socket, time

def helper(store, key):
    return store.get(key)

class Replica:
    def __init__(self, resolve=None):
        self._resolve = resolve or (lambda host: socket.getaddrinfo(host, None))

    def _check(self, host):
        return self._resolve(host)

    async def bad(self, tensor, store):
        time.sleep(1)
        tensor.cpu()
        helper(store, "k")
        self._check("example.com")
        await asyncio.to_thread(helper, store, "k")
        await asyncio.to_thread(lambda: tensor.cpu())
        open("/etc/hosts")  # blocking-ok: read once at start-up

    async def good(self, tensor):
        await asyncio.to_thread(time.sleep, 1)
'''
    path = ROOT / "deployments" / "_lint_probe.py"
    module = Module.__new__(Module)
    module.path = path
    module.source, module.lines = source, source.splitlines()
    module.functions, module.lambdas = {}, {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            module.functions[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    module.functions[f"{node.name}.{item.name}"] = item
                    module._lambdas_of(node.name, item)
    found = sorted(f.split(" ", 1)[1] for f in module.findings())
    assert found == [
        "socket.getaddrinfo on the loop in Replica.bad -> self._check -> self._resolve",
        "store.get on the loop in Replica.bad -> helper",
        "tensor.cpu on the loop in Replica.bad",
        "time.sleep on the loop in Replica.bad",
    ], found
