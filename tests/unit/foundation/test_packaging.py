"""The dependency declarations and their locks agree: every declared dependency is pinned in the
hashed lock within its declared range, requirements.txt is the lock's pins, and the image's serve
lock holds what serving needs and none of the test, benchmark or chart tooling."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[3]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.MULTILINE)


def pins(path: Path) -> dict[str, Version]:
    return {canonicalize_name(name): Version(version) for name, version in PIN.findall(path.read_text())}


def declared() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"base": project["dependencies"], **project["optional-dependencies"]}
    return {group: [Requirement(spec) for spec in specs] for group, specs in groups.items()}


def test_every_declared_dependency_is_locked_with_hashes_inside_its_range() -> None:
    lock_text = (ROOT / "requirements.lock").read_text()
    locked = pins(ROOT / "requirements.lock")
    for group, requirements in declared().items():
        for req in requirements:
            name = canonicalize_name(req.name)
            assert name in locked, f"{req.name} ({group}) is not in requirements.lock: run `make lock`"
            assert req.specifier.contains(locked[name], prereleases=True), (group, str(req), locked[name])
    # Every pinned requirement carries a hash (pip --require-hashes refuses the file otherwise).
    for entry in re.split(r"\n(?=[A-Za-z0-9])", lock_text.split("\n\n", 1)[-1]):
        if PIN.match(entry):
            assert "--hash=sha256:" in entry, entry.splitlines()[0]


def test_requirements_txt_is_the_locks_pins() -> None:
    assert pins(ROOT / "requirements.txt") == pins(ROOT / "requirements.lock")


def test_the_serve_lock_holds_serving_and_no_tooling() -> None:
    serve = pins(ROOT / "k8s" / "requirements-serve.lock")
    locked = pins(ROOT / "requirements.lock")
    groups = declared()
    for req in groups["base"] + groups["serve"]:
        name = canonicalize_name(req.name)
        if name == "torch":  # the image takes torch from its torch index (k8s/Dockerfile)
            assert name not in serve
            continue
        assert serve.get(name) == locked[name], f"{req.name}: serve lock {serve.get(name)}, lock {locked[name]}"
    needed = serving_closure(groups["base"] + groups["serve"])
    for req in groups["dev"] + groups["bench"] + groups["k8s"] + groups["embeddings"]:
        name = canonicalize_name(req.name)
        if name in needed:
            continue  # also what serving needs (PyYAML comes with transformers, rich is the job's)
        assert name not in serve, f"{req.name} is tooling, not serving, yet the image's lock installs it"
    assert {"pytest", "hypothesis", "grpcio-tools", "matplotlib", "kubernetes-validate"}.isdisjoint(serve)


def serving_closure(requirements: list[Requirement]) -> set[str]:
    """The names `requirements` need, transitively, read off the installed distributions' metadata
    (the venv holds every extra, so each is there)."""
    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for spec in requires:
            dep = Requirement(spec)
            if dep.marker is None or dep.marker.evaluate({"extra": ""}):
                todo.append(dep)
    return seen


def test_the_image_copies_what_its_ignore_file_lets_through() -> None:
    dockerfile = (ROOT / "k8s" / "Dockerfile").read_text()
    allowed = [line[1:].rstrip("/") for line in (ROOT / "k8s" / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    sources = [src for line in dockerfile.splitlines() if line.startswith("COPY ") and "--from=" not in line
               for src in line.split()[1:-1]]
    assert sources, "the Dockerfile copies nothing from the context"
    for src in sources:
        src = src.rstrip("/")
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which is not in the repository"
        assert src in allowed, f"the Dockerfile copies {src}, which k8s/Dockerfile.dockerignore leaves out"
    assert "requirements-serve.lock" in dockerfile and "--require-hashes" in dockerfile


def imported_modules(folders: list[str], *, module_level_only: bool) -> dict[str, str]:
    """Full names of the third-party modules the code imports -> one file importing each. Module
    level only: the imports a module cannot run without (not those inside functions or try blocks)."""
    import ast
    import sys

    found: dict[str, str] = {}
    local = {"adaccel", "common", "services", "kernels", "bench", "tests", "k8s", "clients", "adaccel_client"}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            nodes = tree.body if module_level_only else list(ast.walk(tree))
            for node in nodes:
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    # The names may be modules (`from google.rpc import status_pb2`): the longest
                    # known prefix decides in distribution_of.
                    names = [f"{node.module}.{alias.name}" for alias in node.names]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                        found.setdefault(name, str(path.relative_to(ROOT)))
    return found


def distribution_of(module: str, owners: dict[str, str]) -> str | None:
    """The installed distribution that holds `module`: its longest package prefix that one
    distribution ships (namespace packages such as opentelemetry span many distributions, so
    `opentelemetry.instrumentation.logging` decides, not `opentelemetry`)."""
    parts = module.split(".")
    for depth in range(len(parts), 0, -1):
        owner = owners.get("/".join(parts[:depth]))
        if owner is not None:
            return owner
    return None  # a bare namespace (`import opentelemetry`), or not installed here


def installed_files() -> dict[str, str]:
    """Module paths ("a/b" for a/b/__init__.py or a/b.py, "m" for an extension module m.*.so) -> the
    distribution that ships them, from the installed distributions' RECORD files."""
    owners: dict[str, str] = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        for file in dist.files or []:
            path = str(file)
            if path.endswith("/__init__.py"):
                owners.setdefault(path.removesuffix("/__init__.py"), name)
            elif path.endswith(".py"):
                owners.setdefault(path.removesuffix(".py"), name)
            elif "/" not in path and path.endswith(".so"):
                owners.setdefault(path.split(".")[0], name)
    return owners


# The embedded broker of `make run` / `make test` (services/stack.py): never started in the image.
LOCAL_RUN_ONLY = {"common/broker.py"}
# Benchmark peers built into the venv by a make target, not declared (so not locked): the
# SuffixDecoding peer of bench-decode / bench-draft-replay comes from its sdist (`make suffix-peer`).
BUILT_BY_MAKE_TARGET = {"arctic-inference"}


def test_what_the_code_imports_is_declared() -> None:
    files = installed_files()
    groups = declared()
    everything = serving_closure([req for reqs in groups.values() for req in reqs])
    serving = serving_closure(groups["base"] + groups["serve"])
    for module, where in imported_modules(["common", "services", "kernels", "bench", "k8s", "tests"],
                                          module_level_only=False).items():
        owner = distribution_of(module, files)
        if owner is None:
            continue  # not installed here: an optional import the code guards (a GPU-only package, say)
        if owner in BUILT_BY_MAKE_TARGET:
            continue
        assert owner in everything, f"{where} imports {module} ({owner}), which no group of pyproject.toml declares"
    for module, where in imported_modules(["common", "services", "kernels"], module_level_only=True).items():
        if where in LOCAL_RUN_ONLY:
            continue
        owner = distribution_of(module, files)
        if owner is None and module.split(".")[0] == module:
            continue  # a bare namespace package
        assert owner in serving, f"{where} needs {module} ({owner}) to import, but base + serve lacks it"
