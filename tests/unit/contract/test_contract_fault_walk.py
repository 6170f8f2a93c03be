"""Every served WSDL operation declares every typed fault its implementation raises, found by a static walk of the
source from the operation's handler (tests/unit/contract/fault_walk.py): a fault the WSDL does not name breaks a
typed client (zeep, gSOAP, Axis read only the declared details), and the container answers it as InternalFault in
tests (services/container/app.py). The faults every operation may answer (CONTAINER_FAULTS, a descriptor's
InvalidDescriptorFault) are test_contract_wsdl's."""
from __future__ import annotations

import importlib

import pytest
from lxml import etree

from services.container.contract import WSDL_DIR, Contract
from tests.unit.contract.fault_walk import Project

LIMIT = ("services.faults", "LimitExceeded")
WSDL = "http://schemas.xmlsoap.org/wsdl/"

# Where the walk counts more than can happen, and why: (wsdl, operation, fault) -> the reason. Each entry is checked
# to be still needed (the walk still finds the fault, the WSDL does not declare it).
OVERCOUNTED = {
    ("vmrepository.wsdl", "RegisterImage", "UnknownImageFault"):
        "Catalogue._add raises it for a descriptor added without bytes (DuplicateImage's); RegisterImage always "
        "hands it the ingested bytes",
    ("vmrepository.wsdl", "HoldImage", "LimitExceededFault"):
        "HoldImage's context is seconds, which no obligation limits (pep.REQUEST_LIMITS: memory, vcpus, "
        "lifetime); the hold is cut to max_lifetime instead",
}


@pytest.fixture(scope="module")
def project() -> Project:
    return walked()


def walked() -> Project:
    p = Project()
    # the obligations (LimitExceeded) apply to the amounts a request asks for: a check without them cannot exceed
    p.conditional = {
        ("services.authz.pep", "Enforcer.check"): ("context", 3, {LIMIT}),
        ("services.vmmanager.node", "Node._authorized"): ("**", 0, {LIMIT}),
        ("services.vmmanager.migration", "_authorized"): ("**", 0, {LIMIT}),
        ("services.vmrepository.registry", "Registry._authorized"): ("context", 4, {LIMIT}),
    }
    p.value_faults = {("services.authz.pep", "Enforcer.check_many"): ("services.authz.pep", "Enforcer.check")}
    return p


def _element(key) -> str:
    return getattr(importlib.import_module(key[0]), key[1]).element


def _found(project: Project, wsdl: str) -> dict[str, dict[str, tuple]]:
    return {name: {_element(k): path for k, path in found.items()}
            for name, found in project.operation_faults()[wsdl].items()}


WSDL_FILES = sorted(p.name for p in WSDL_DIR.glob("*.wsdl"))


def test_every_wsdl_is_served_by_a_service_whose_handlers_are_walked(project):
    operations = project.operations()
    assert sorted(operations) == WSDL_FILES
    for wsdl, handlers in operations.items():
        contract = Contract(wsdl)
        assert set(handlers) == set(contract.operations), wsdl
        # the copy the container serves at ?wsdl declares the same faults as the file checked here
        served = etree.fromstring(contract.served_wsdl("https://node.example.org:8444", "X"))
        for op in served.iterfind(f"{{{WSDL}}}portType/{{{WSDL}}}operation"):
            faults = tuple(f.get("name") for f in op.iterfind(f"{{{WSDL}}}fault"))
            assert faults == contract.operations[op.get("name")].faults, (wsdl, op.get("name"))


@pytest.mark.parametrize("wsdl", WSDL_FILES)
def test_every_operation_declares_every_fault_its_implementation_raises(project, wsdl):
    contract = Contract(wsdl)
    gaps = []
    for name, found in sorted(_found(project, wsdl).items()):
        for fault, path in sorted(found.items()):
            if fault not in contract.operations[name].faults and (wsdl, name, fault) not in OVERCOUNTED:
                gaps.append(f"{name} raises {fault}, undeclared:\n    " + "\n    ".join(path))
    assert not gaps, f"{wsdl}:\n" + "\n".join(gaps)


def test_each_overcounted_fault_is_still_found_and_undeclared(project):
    for (wsdl, name, fault), why in OVERCOUNTED.items():
        assert fault in _found(project, wsdl)[name], (wsdl, name, fault, "no longer found: drop the entry")
        assert fault not in Contract(wsdl).operations[name].faults, (wsdl, name, fault, "declared now")


def test_the_walk_follows_calls_into_the_core_and_respects_handlers(project):
    vmm = _found(project, "vmmanager.wsdl")
    # Pause: the state check two calls down (node.pause -> _control -> states.check)
    assert "IllegalTransitionFault" in vmm["Pause"]
    assert any("services.vmmanager.states:check" in step for step in vmm["Pause"]["IllegalTransitionFault"])
    # no amount asked: the authorization's obligations cannot refuse it
    assert "LimitExceededFault" not in vmm["Pause"]
    assert "LimitExceededFault" in vmm["Deploy"]
    # the remote policy point's _call turns the Authorization service's InternalFault into ServiceUnavailable
    authz = _found(project, "authz.wsdl")
    assert "InvalidPolicyFault" in authz["AddRule"]      # raise exc.fault(), exc of an `except PolicyError as exc`
    # a fault handed back as a value and raised (ImportImages' batch of decisions)
    assert "LimitExceededFault" in _found(project, "vmrepository.wsdl")["ImportImages"]


def test_the_walk_on_a_small_service(tmp_path):
    """What the walk follows and what it does not count, on a service written for it."""
    pkg = tmp_path / "services"
    (pkg / "demo").mkdir(parents=True)
    for init in (pkg / "__init__.py", pkg / "demo" / "__init__.py"):
        init.write_text("")
    (pkg / "faults.py").write_text(
        "class VMGridFault(Exception):\n    element = ''\n"
        "class Busy(VMGridFault):\n    element = 'BusyFault'\n"
        "class Gone(VMGridFault):\n    element = 'GoneFault'\n"
        "class Wrong(VMGridFault):\n    element = 'WrongFault'\n"
        "class Over(VMGridFault):\n    element = 'OverFault'\n")
    (pkg / "demo" / "core.py").write_text(
        "from services.faults import Busy, Gone, Over, VMGridFault, Wrong\n"
        "def gone() -> Gone:\n    return Gone('x')\n"
        "def limit(amount=None):\n    if amount:\n        raise Over('x')\n"
        "class Store:\n    def get(self):\n        raise gone()\n"
        "class Base:\n    def act(self):\n        pass\n"
        "class Busy_(Base):\n    def act(self):\n        raise Busy('x')\n"
        "class Core:\n"
        "    def __init__(self, engine: Base):\n        self.store = Store()\n        self.engine = engine\n"
        "    def read(self):\n        return self.store.get()\n"
        "    def quiet(self):\n"
        "        try:\n            self.store.get()\n        except VMGridFault:\n            return None\n"
        "    def reworded(self):\n"
        "        try:\n            self.store.get()\n        except Gone as exc:\n            raise Wrong(str(exc))\n"
        "    def passed_on(self):\n"
        "        try:\n            self.read()\n        except Gone:\n            raise\n"
        "    def run(self):\n        self.engine.act()\n"
        "    def ask(self, amount=None):\n        limit(amount)\n")
    (pkg / "demo" / "service.py").write_text(
        "from services.demo.core import Core\n"
        "def operation(name):\n    return lambda f: f\n"
        "class DemoService:\n    wsdl = 'demo.wsdl'\n"
        "    def __init__(self, engine):\n        self.core = Core(engine)\n"
        "    @operation('Read')\n    def read(self, ctx, req):\n        return self.core.read()\n"
        "    @operation('Quiet')\n    def quiet(self, ctx, req):\n        return self.core.quiet()\n"
        "    @operation('Reworded')\n    def reworded(self, ctx, req):\n        return self.core.reworded()\n"
        "    @operation('PassedOn')\n    def passed_on(self, ctx, req):\n        return self.core.passed_on()\n"
        "    @operation('Run')\n    def run(self, ctx, req):\n        return self.core.run()\n"
        "    @operation('Plain')\n    def plain(self, ctx, req):\n        return self.core.ask()\n"
        "    @operation('Amount')\n    def amount(self, ctx, req):\n        return self.core.ask(5)\n")
    p = Project(tmp_path, ("services",))
    p.conditional = {("services.demo.core", "Core.ask"): ("amount", 0, {("services.faults", "Over")})}
    found = {name: sorted(k[1] for k in faults) for name, faults in p.operation_faults()["demo.wsdl"].items()}
    assert found == {
        "Read": ["Gone"],                   # two calls down, raised through a function answering the fault
        "Quiet": [],                        # caught and not raised again
        "Reworded": ["Wrong"],              # caught, another raised instead
        "PassedOn": ["Gone"],               # caught and raised again (a bare raise)
        "Run": ["Busy"],                    # a subclass's override of the annotated attribute's method
        "Plain": [],                        # no amount asked: the conditional fault is not passed on
        "Amount": ["Over"],
    }
