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
