"""Which typed faults each SOAP operation's implementation can raise, found by a static walk of the source.

From each ``@operation`` handler of a service (a ``SoapService`` subclass naming its ``wsdl``), the walk follows the
calls it can resolve (module functions, imports, ``self`` methods, the attributes ``__init__`` assigns from a
constructor or an annotated parameter, annotated parameters and locals, ``except T as name``, return annotations;
a method reached through a base class reaches its subclasses' overrides too), and collects ``raise F(...)``
(``F`` a ``services.faults.VMGridFault`` subclass, or a function whose return annotation is one). A fault raised
inside a ``try`` whose handler catches it counts only when the handler raises it again (a bare ``raise`` or
``raise name``); what a handler raises counts. Calls it cannot resolve (a callable in a variable, ``getattr``) are
not followed, nor is a fault a remote service answered and a client re-raises (``raise typed`` in
services/soapclient.py): it finds what this code raises, not all it may pass on.
"""
from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("services",)
FAULT_BASE = ("services.faults", "VMGridFault")
CATCH_ALL = {"Exception", "BaseException"}


@dataclass
class Module:
    name: str
    tree: ast.Module
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)   # local -> (module, attr or None)
    defs: dict[str, ast.AST] = field(default_factory=dict)


@dataclass
class ClassInfo:
    key: tuple[str, str]
    node: ast.ClassDef
    bases: list[tuple[str, str]] = field(default_factory=list)
    methods: dict[str, ast.FunctionDef] = field(default_factory=dict)
    attrs: dict[str, set] = field(default_factory=dict)           # self.x -> class keys


class Project:
    def __init__(self, root: Path = ROOT, packages=PACKAGES):
        self.root = root
        self.modules: dict[str, Module] = {}
        for package in packages:
            for path in sorted((root / package).rglob("*.py")):
                rel = path.relative_to(root).with_suffix("")
                parts = list(rel.parts)
                if parts[-1] == "__init__":
                    parts.pop()
                name = ".".join(parts)
                self.modules[name] = Module(name, ast.parse(path.read_text(), str(path)))
        for mod in self.modules.values():
            self._index(mod)
        self.classes: dict[tuple[str, str], ClassInfo] = {}
        for mod in self.modules.values():
            for name, node in mod.defs.items():
                if isinstance(node, ast.ClassDef):
                    self.classes[(mod.name, name)] = ClassInfo((mod.name, name), node)
        for info in self.classes.values():
            self._read_class(info)
        self.faults = {k for k in self.classes if self._is_fault(k)}
        # the faults a function raises only when its caller gives it an argument: see _not_passed_on
        self.conditional: dict[tuple[str, str], tuple[str, int, set]] = {}
        # functions that hand faults back as values (a list of answers), and the function whose faults they are:
        # a ``raise name`` of a value the walk cannot type, in a function that calls one, raises those
        self.value_faults: dict[tuple[str, str], tuple[str, str]] = {}
        self._func_raises: dict[int, dict] = {}
        self._previous: dict[int, dict] = {}
        self._settled: dict | None = None
        self._in_progress: set[int] = set()
        self.unresolved: set[str] = set()

    # -- indexing ---------------------------------------------------------------------------------------------
    def _index(self, mod: Module) -> None:
        package = mod.name if self._is_package(mod.name) else mod.name.rpartition(".")[0]
        for node in mod.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                mod.defs[node.name] = node
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        mod.imports[a.asname] = (a.name, None)
                    else:
                        mod.imports[a.name.split(".")[0]] = (a.name.split(".")[0], None)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                     else []))
                for a in node.names:
                    mod.imports[a.asname or a.name] = (base, a.name)
        for node in ast.walk(mod.tree):      # imports inside functions too (a late import is common here)
            if isinstance(node, ast.ImportFrom) and node.col_offset > 0 and node.module and not node.level:
                for a in node.names:
                    mod.imports.setdefault(a.asname or a.name, (node.module, a.name))

    def _is_package(self, name: str) -> bool:
        return (self.root / name.replace(".", "/") / "__init__.py").exists()

    def resolve(self, module: str, name: str, depth: int = 0):
        """What ``name`` means in ``module``: ("class", key), ("func", node, module), ("module", name) or None."""
        mod = self.modules.get(module)
        if mod is None or depth > 10:
            return None
        node = mod.defs.get(name)
        if isinstance(node, ast.ClassDef):
            return ("class", (module, name))
        if node is not None:
            return ("func", node, module)
        if name in mod.imports:
            target, attr = mod.imports[name]
            if attr is None:
                return ("module", target)
            if f"{target}.{attr}" in self.modules:
                return ("module", f"{target}.{attr}")
            return self.resolve(target, attr, depth + 1)
        return None

    def _type_of_annotation(self, module: str, ann) -> set:
        if ann is None:
            return set()
        if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
            try:
                ann = ast.parse(ann.value, mode="eval").body
            except SyntaxError:
                return set()
        if isinstance(ann, ast.BinOp):
            return self._type_of_annotation(module, ann.left) | self._type_of_annotation(module, ann.right)
        if isinstance(ann, ast.Subscript):        # Optional[X], list[X]: X
            inner = ann.slice
            elts = inner.elts if isinstance(inner, ast.Tuple) else [inner]
            out = set()
            for e in elts:
                out |= self._type_of_annotation(module, e)
            return out
        r = self._resolve_expr_static(module, ann)
        return {r[1]} if r and r[0] == "class" else set()

    def _resolve_expr_static(self, module: str, expr):
        if isinstance(expr, ast.Name):
            return self.resolve(module, expr.id)
        if isinstance(expr, ast.Attribute):
            base = self._resolve_expr_static(module, expr.value)
            if base and base[0] == "module":
                if f"{base[1]}.{expr.attr}" in self.modules:
                    return ("module", f"{base[1]}.{expr.attr}")
                return self.resolve(base[1], expr.attr)
        return None

    def _read_class(self, info: ClassInfo) -> None:
        module = info.key[0]
        for b in info.node.bases:
            r = self._resolve_expr_static(module, b)
            if r and r[0] == "class":
                info.bases.append(r[1])
        for node in info.node.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                info.methods[node.name] = node
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                info.attrs.setdefault(node.target.id, set()).update(self._type_of_annotation(module, node.annotation))
        for func in info.methods.values():
            params = {a.arg: self._type_of_annotation(module, a.annotation)
                      for a in func.args.args + func.args.kwonlyargs}
            for node in ast.walk(func):
                targets, value, ann = [], None, None
                if isinstance(node, ast.Assign):
                    targets, value = node.targets, node.value
                elif isinstance(node, ast.AnnAssign):
                    targets, value, ann = [node.target], node.value, node.annotation
                for t in targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        types = self._type_of_annotation(module, ann)
                        # x or Default(): each alternative as a value of its own
                        for v in value.values if isinstance(value, ast.BoolOp) else [value]:
                            if isinstance(v, ast.Call):
                                r = self._resolve_expr_static(module, v.func)
                                if r and r[0] == "class":
                                    types.add(r[1])
                            elif isinstance(v, ast.Name) and v.id in params:
                                types |= params[v.id]
                        if types:
                            info.attrs.setdefault(t.attr, set()).update(types)

    def mro(self, key) -> list:
        out, todo = [], [key]
        while todo:
            k = todo.pop(0)
            if k in out or k not in self.classes:
                continue
            out.append(k)
            todo += self.classes[k].bases
        return out

    def subclasses(self, key) -> list:
        return [k for k in self.classes if key in self.mro(k)]

    def _is_fault(self, key) -> bool:
        return FAULT_BASE in self.mro(key)

    def methods_named(self, cls_key, name: str) -> list[tuple[ast.FunctionDef, str, tuple]]:
        """The method ``name`` a value of class ``cls_key`` may run: the inherited one and subclasses' overrides."""
        out = []
        for k in self.mro(cls_key):
            if name in self.classes[k].methods:
                out.append((self.classes[k].methods[name], k[0], k))
                break
        for k in self.subclasses(cls_key):
            if k != cls_key and name in self.classes[k].methods:
                out.append((self.classes[k].methods[name], k[0], k))
        return out

    def attr_types(self, cls_key, attr: str) -> set:
        out = set()
        for k in self.mro(cls_key):
            out |= self.classes[k].attrs.get(attr, set())
            m = self.classes[k].methods.get(attr)
            if m is not None and any(isinstance(d, ast.Name) and d.id in ("property", "cached_property")
                                     for d in m.decorator_list):
                out |= self._type_of_annotation(k[0], m.returns)
        return out

    # -- the walk ---------------------------------------------------------------------------------------------
    def raises(self, func, module: str, cls) -> dict:
        """The fault classes (keys) a call of ``func`` (in ``module``, a method of ``cls`` or None) can raise, each
        with the way to one raise site (``module:function:line`` steps)."""
        ident = id(func)
        if ident in self._func_raises:
            return self._func_raises[ident]
        if ident in self._in_progress:          # recursion: the last pass's answer (operation_faults iterates)
            return self._previous.get(ident, {})
        self._in_progress.add(ident)
        walker = _FunctionWalk(self, func, module, cls)
        result = walker.block(func.body)
        self._in_progress.discard(ident)
        self._func_raises[ident] = result
        return result

    def operation_faults(self) -> dict[str, dict[str, dict]]:
        """{wsdl file: {operation: {fault class key: path}}}: the walk from every handler, repeated until no cycle of
        calls (a function reached again while it is being walked) changes an answer."""
        if self._settled is not None:
            return self._settled
        self.passes = 0
        while True:
            self.passes += 1
            out = {wsdl: {name: self.raises(func, module, cls) for name, (func, module, cls) in handlers.items()}
                   for wsdl, handlers in self.operations().items()}
            if all(set(self._previous.get(k, {})) == set(v) for k, v in self._func_raises.items()):
                self._settled = out
                return out
            self._previous, self._func_raises = self._func_raises, {}

    def operations(self) -> dict[str, dict[str, tuple]]:
        """{wsdl file: {operation: (handler, module, class key)}} for every service class that names a WSDL."""
        out: dict[str, dict[str, tuple]] = {}
        for key, info in self.classes.items():
            wsdl = None
            for node in info.node.body:
                if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "wsdl"
                                                        for t in node.targets) and isinstance(node.value, ast.Constant):
                    wsdl = node.value.value
            if not wsdl:
                continue
            for func in info.methods.values():
                for d in func.decorator_list:
                    if isinstance(d, ast.Call) and isinstance(d.func, ast.Name) and d.func.id == "operation":
                        out.setdefault(wsdl, {})[d.args[0].value] = (func, key[0], key)
        return out


class _FunctionWalk:
    def __init__(self, project: Project, func, module: str, cls):
        self.p, self.func, self.module, self.cls = project, func, module, cls
        self.locals: dict[str, set] = {}
        self.local_funcs: dict[str, ast.AST] = {}
        for a in func.args.args + func.args.kwonlyargs + func.args.posonlyargs:
            self.locals[a.arg] = project._type_of_annotation(module, a.annotation)
        if cls is not None and func.args.args:
            self.locals[func.args.args[0].arg] = {cls}
        for node in ast.walk(func):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node is not func:
                self.local_funcs[node.name] = node
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                t = self.expr_types(node.value)
                if t:
                    self.locals.setdefault(node.targets[0].id, set()).update(t)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                self.locals.setdefault(node.target.id, set()).update(
                    project._type_of_annotation(module, node.annotation))
            elif isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
                for t in (node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]):
                    r = project._resolve_expr_static(module, t)
                    if r and r[0] == "class":
                        self.locals.setdefault(node.name, set()).add(r[1])
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    if isinstance(item.optional_vars, ast.Name):
                        t = self.expr_types(item.context_expr)
                        if t:
                            self.locals.setdefault(item.optional_vars.id, set()).update(t)

    # what an expression's value is: class keys
    def expr_types(self, expr) -> set:
        p = self.p
        if isinstance(expr, ast.Name):
            if expr.id in self.locals:
                return set(self.locals[expr.id])
            r = p.resolve(self.module, expr.id)
            return {r[1]} if r and r[0] == "class" else set()
        if isinstance(expr, ast.Attribute):
            r = p._resolve_expr_static(self.module, expr)
            if r and r[0] == "class":
                return {r[1]}
            out = set()
            for t in self.expr_types(expr.value):
                out |= p.attr_types(t, expr.attr)
            return out
        if isinstance(expr, ast.Call):
            out = set()
            for target in self.callees(expr.func):
                kind = target[0]
                if kind == "class":
                    out.add(target[1])
                elif kind == "func":
                    out |= p._type_of_annotation(target[2], target[1].returns)
            return out
        if isinstance(expr, ast.BoolOp):
            out = set()
            for v in expr.values:
                out |= self.expr_types(v)
            return out
        return set()

    def callees(self, func_expr) -> list:
        """What a call of ``func_expr`` runs: ("class", key) or ("func", node, module, class key or None)."""
        p = self.p
        if isinstance(func_expr, ast.Name):
            if func_expr.id in self.local_funcs:
                return [("func", self.local_funcs[func_expr.id], self.module, self.cls)]
            if func_expr.id in self.locals:
                return []
            r = p.resolve(self.module, func_expr.id)
            if r and r[0] == "class":
                return [("class", r[1])]
            if r and r[0] == "func":
                return [("func", r[1], r[2], None)]
            if func_expr.id not in dir(builtins):
                p.unresolved.add(f"{self.module}:{func_expr.id}")
            return []
        if isinstance(func_expr, ast.Attribute):
            r = p._resolve_expr_static(self.module, func_expr)
            if r and r[0] == "class":
                return [("class", r[1])]
            if r and r[0] == "func":
                return [("func", r[1], r[2], None)]
            if isinstance(func_expr.value, ast.Call) and isinstance(func_expr.value.func, ast.Name) and \
                    func_expr.value.func.id == "super" and self.cls:
                out = []
                for base in p.classes[self.cls].bases:
                    for node, mod, k in p.methods_named(base, func_expr.attr)[:1]:
                        out.append(("func", node, mod, k))
                return out
            out = []
            for t in self.expr_types(func_expr.value):
                for node, mod, k in p.methods_named(t, func_expr.attr):
                    out.append(("func", node, mod, k))
            return out
        return []

    def _site(self, node) -> str:
        owner = f"{self.cls[1]}." if self.cls else ""
        return f"{self.module}:{owner}{self.func.name}:{node.lineno}"

    def call_raises(self, call: ast.Call) -> dict:
        out: dict = {}
        targets = []
        for target in self.callees(call.func):
            if target[0] == "class":
                for node, mod, k in self.p.methods_named(target[1], "__init__")[:1]:
                    targets.append((node, mod, k))
            else:
                targets.append(target[1:])
        # a function handed to another (a callback run at once, e.g. self._edit(self.authority.add_rule, ...))
        for arg in call.args:
            if isinstance(arg, (ast.Attribute, ast.Name)):
                targets += [t[1:] for t in self._references(arg)]
        for node, mod, k in targets:
            dropped = self._not_passed_on(call, node, mod, k)
            for fault, path in self.p.raises(node, mod, k).items():
                if fault not in dropped:
                    out.setdefault(fault, (self._site(call),) + path)
        return out

    def _not_passed_on(self, call: ast.Call, node, module: str, cls) -> set:
        """The faults ``node`` raises only when this call gives it an argument it does not give (Project.conditional:
        qualified name -> (parameter, its position after self, fault keys); parameter "**": any keyword beyond
        the named ones)."""
        qualname = f"{cls[1]}.{node.name}" if cls else node.name
        rule = self.p.conditional.get((module, qualname))
        if rule is None:
            return set()
        param, position, faults = rule
        if param == "**":
            named = {a.arg for a in node.args.args + node.args.kwonlyargs}
            given = any(kw.arg is None or kw.arg not in named for kw in call.keywords)
        else:
            given = len(call.args) > position or any(kw.arg in (param, None) for kw in call.keywords)
        return set() if given else set(faults)

    def _references(self, expr) -> list:
        if isinstance(expr, ast.Name) and expr.id in self.local_funcs:
            return [("func", self.local_funcs[expr.id], self.module, self.cls)]
        if isinstance(expr, ast.Attribute):
            return [t for t in self.callees(expr) if t[0] == "func"]
        return []

    def raised(self, exc, caught: dict | None) -> dict:
        """The fault classes ``raise exc`` raises. A function answering the base class (``-> VMGridFault``, e.g.
        one that rewords the fault it is given) passes on what its handler caught."""
        out = self._raised(exc)
        if FAULT_BASE in out:
            here = out.pop(FAULT_BASE)
            for fault, path in (caught or self._value_faults(here)).items():
                out.setdefault(fault, path)
        return out

    def _raised(self, exc) -> dict:
        p = self.p
        here = (self._site(exc),)
        if isinstance(exc, ast.Call):
            out: dict = {}
            for target in self.callees(exc.func):
                if target[0] == "class" and target[1] in p.faults:
                    out.setdefault(target[1], here)
                elif target[0] == "func":
                    for t in p._type_of_annotation(target[2], target[1].returns):
                        if t in p.faults:
                            out.setdefault(t, here)
            for fault, path in self.call_raises(exc).items():
                out.setdefault(fault, path)
            return out
        return {t: here for t in self.expr_types(exc) if t in p.faults} or self._value_faults(here)

    def _value_faults(self, here: tuple) -> dict:
        p, out = self.p, {}
        for call in ast.walk(self.func):
            if not isinstance(call, ast.Call):
                continue
            for target in self.callees(call.func):
                if target[0] != "func":
                    continue
                qualname = f"{target[3][1]}.{target[1].name}" if target[3] else target[1].name
                source = p.value_faults.get((target[2], qualname))
                if source is None:
                    continue
                module, _, name = source[0], None, source[1]
                cls_name, _, func_name = name.rpartition(".")
                cls = (module, cls_name) if cls_name else None
                node = p.classes[cls].methods[func_name] if cls else p.modules[module].defs[func_name]
                for fault, path in p.raises(node, module, cls).items():
                    out.setdefault(fault, here + (f"(the answers of {target[2]}:{qualname} are those of "
                                                  f"{module}:{name})",) + path)
        return out

    def catches(self, handler: ast.ExceptHandler, fault) -> bool:
        if handler.type is None:
            return True
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        for t in types:
            if isinstance(t, ast.Name) and t.id in CATCH_ALL:
                return True
            r = self.p._resolve_expr_static(self.module, t)
            if r is None and isinstance(t, ast.Name):       # a module-level tuple such as RETRYABLE
                r = self._tuple_of(t.id)
            if r and r[0] == "class" and r[1] in self.p.mro(fault):
                return True
            if r and r[0] == "tuple" and any(k in self.p.mro(fault) for k in r[1]):
                return True
        return False

    def _tuple_of(self, name: str):
        mod_name, attr = self.module, name
        imp = self.p.modules[self.module].imports.get(name)
        if imp and imp[1]:
            mod_name, attr = imp
        mod = self.p.modules.get(mod_name)
        if mod is None:
            return None
        for node in mod.tree.body:
            value = None
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attr for t in node.targets):
                value = node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == attr:
                value = node.value
            if isinstance(value, ast.Tuple):
                keys = []
                for e in value.elts:
                    r = self.p._resolve_expr_static(mod_name, e)
                    if r and r[0] == "class":
                        keys.append(r[1])
                return ("tuple", keys)
        return None

    def block(self, stmts, caught: dict | None = None, caught_name: str | None = None) -> dict:
        out: dict = {}
        for s in stmts:
            for fault, path in self.stmt(s, caught, caught_name).items():
                out.setdefault(fault, path)
        return out

    def stmt(self, s, caught, caught_name) -> dict:
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return {}                           # counted where it is called
        if isinstance(s, ast.Try) or type(s).__name__ == "TryStar":
            remaining = self.block(s.body, caught, caught_name)
            out: dict = {}
            for h in s.handlers:
                got = {f: path for f, path in remaining.items() if self.catches(h, f)}
                for f in got:
                    del remaining[f]
                out.update(self.block(h.body, got, h.name))
            for part in (self.block(s.orelse, caught, caught_name), self.block(s.finalbody, caught, caught_name),
                         remaining):
                for fault, path in part.items():
                    out.setdefault(fault, path)
            return out
        if isinstance(s, ast.Raise):
            if s.exc is None or (isinstance(s.exc, ast.Name) and s.exc.id == caught_name):
                return dict(caught or {})
            out = self.raised(s.exc, caught)
            for fault, path in self.exprs(s.exc, skip_top=True).items():
                out.setdefault(fault, path)
            return out
        out = {}
        for name, value in ast.iter_fields(s):
            items = value if isinstance(value, list) else [value]
            if items and all(isinstance(i, ast.stmt) for i in items):
                part = self.block(items, caught, caught_name)
            else:
                part = {}
                for i in items:
                    if isinstance(i, ast.AST):
                        part.update(self.exprs(i))
            for fault, path in part.items():
                out.setdefault(fault, path)
        return out

    def exprs(self, node, skip_top: bool = False) -> dict:
        out: dict = {}
        for n in ast.walk(node):
            if isinstance(n, ast.Call) and not (skip_top and n is node):
                for fault, path in self.call_raises(n).items():
                    out.setdefault(fault, path)
        return out
