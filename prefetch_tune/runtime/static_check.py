"""Resolve a line's hook points in a real vLLM-Ascend wheel or sdist, without importing it.

Pure Python (zipfile / tarfile + ast): no torch, torch_npu or vllm_ascend import, so it runs on
any machine. For each hook point of the archive's line it checks the module file exists, the
class and method (or function) are defined there, the method's leading parameters are the ones
the wrapper passes on, and every attribute the wrapper reads is used in that module.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from prefetch_tune.errors import BackendError, ConfigError
from prefetch_tune.runtime.lines import HookSpec, Line, all_hooks, line_for

_NAME_RE = re.compile(r"vllm_ascend-([^-]+?)(?:-|\.tar\.gz$)")


@dataclass(frozen=True)
class SymbolCheck:
    hook: str
    target: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class ArchiveCheck:
    path: str
    version: str
    line: Line
    checks: tuple[SymbolCheck, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[str]:
        return [
            f"vllm-ascend {self.version} (line {self.line.name}): {c.hook} {c.target}: {c.detail}"
            for c in self.checks
            if not c.ok
        ]


def version_of(path: Path) -> str:
    match = _NAME_RE.search(path.name)
    if match is None:
        raise ConfigError(f"--wheel {path}: not a vllm_ascend wheel or sdist file name")
    return match.group(1)


def read_sources(path: Path) -> dict[str, str]:
    """`vllm_ascend/...py` -> source text, from a wheel (.whl) or an sdist (.tar.gz)."""
    if not path.is_file():
        raise ConfigError(f"--wheel {path}: no such file")
    out: dict[str, str] = {}
    try:
        if path.name.endswith(".whl"):
            with zipfile.ZipFile(path) as zf:
                for name in zf.namelist():
                    if name.startswith("vllm_ascend/") and name.endswith(".py"):
                        out[name] = zf.read(name).decode("utf-8", "replace")
        elif path.name.endswith(".tar.gz"):
            with tarfile.open(path) as tf:
                for member in tf.getmembers():
                    # sdist: <name>-<version>/vllm_ascend/...
                    rel = member.name.split("/", 1)[-1]
                    if member.isfile() and rel.startswith("vllm_ascend/") and rel.endswith(".py"):
                        handle = tf.extractfile(member)
                        if handle is not None:
                            out[rel] = handle.read().decode("utf-8", "replace")
        else:
            raise ConfigError(f"--wheel {path}: expected a .whl or .tar.gz")
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
        raise ConfigError(f"--wheel {path}: cannot read it ({exc})") from None
    if not out:
        raise ConfigError(f"--wheel {path}: holds no vllm_ascend sources")
    return out


def _module_file(sources: dict[str, str], module: str) -> str | None:
    base = module.replace(".", "/")
    for candidate in (f"{base}.py", f"{base}/__init__.py"):
        if candidate in sources:
            return candidate
    return None


def _find(tree: ast.Module, attr: str) -> ast.FunctionDef | ast.AsyncFunctionDef | str:
    """The function node `Class.method` / `function` in `tree`, or why it is not there."""
    *owners, name = attr.split(".")
    body: list[ast.stmt] = tree.body
    for owner in owners:
        cls = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == owner), None)
        if cls is None:
            return f"class {owner} not found"
        body = cls.body
    func = next(
        (
            n
            for n in body
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name
        ),
        None,
    )
    if func is None:
        return f"{'method' if owners else 'function'} {name} not found"
    return func


def check_hook(sources: dict[str, str], hook: HookSpec) -> SymbolCheck:
    """Resolve one hook point in `sources`; `detail` names the first missing symbol."""

    def result(ok: bool, detail: str) -> SymbolCheck:
        return SymbolCheck(hook.name, hook.target, ok, detail)

    path = _module_file(sources, hook.module)
    if path is None:
        return result(False, f"module {hook.module} not found")
    try:
        tree = ast.parse(sources[path])
    except SyntaxError as exc:
        return result(False, f"{path} does not parse ({exc.msg})")
    found = _find(tree, hook.attr)
    if isinstance(found, str):
        return result(False, found)
    params = [a.arg for a in (*found.args.posonlyargs, *found.args.args)]
    if tuple(params[: len(hook.params)]) != hook.params:
        return result(
            False,
            f"parameters ({', '.join(params)}) do not start with ({', '.join(hook.params)})",
        )
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    missing = [a for a in hook.reads if a not in used]
    if missing:
        return result(False, f"attribute {missing[0]} not used in {path}")
    return result(True, f"{path}:{found.lineno}")


def check_archive(path: Path) -> ArchiveCheck:
    """Resolve every hook point of the line `path`'s version belongs to."""
    version = version_of(path)
    sources = read_sources(path)
    line = line_for(version)
    checks = tuple(check_hook(sources, hook) for hook in all_hooks(line))
    return ArchiveCheck(str(path), version, line, checks)


def default_cache() -> Path:
    import os

    raw = os.environ.get("PREFETCH_TUNE_WHEEL_CACHE", "").strip()
    return Path(raw).expanduser() if raw else Path.home() / ".cache/prefetch-tune/wheels"


def cached(version: str, cache: Path) -> Path | None:
    for pattern in (f"vllm_ascend-{version}-*.whl", f"vllm_ascend-{version}.tar.gz"):
        hits = sorted(cache.glob(pattern))
        if hits:
            return hits[0]
    return None


def download(version: str, cache: Path | None = None) -> Path:
    """The wheel (or sdist) of vllm-ascend `version`, from the cache or `pip download`.

    Releases from 0.27.1rc1 ship only an sdist whose build dependencies are not on the index,
    so `pip download` fails preparing its metadata; then the sdist pip resolved (the URL in its
    verbose log) is fetched from the same registry.
    """
    cache = cache or default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    hit = cached(version, cache)
    if hit is not None:
        return hit
    cmd = [sys.executable, "-m", "pip", "download", "-v", "--no-deps"]
    cmd += ["--only-binary=:all:", f"vllm-ascend=={version}", "-d", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    hit = cached(version, cache)
    if hit is not None:
        return hit
    cmd = [sys.executable, "-m", "pip", "download", "-vvv", "--no-deps"]
    cmd += ["--no-build-isolation", f"vllm-ascend=={version}", "-d", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    hit = cached(version, cache)
    if hit is not None:
        return hit
    sdist = f"vllm_ascend-{version}.tar.gz"
    urls = re.findall(r"https://\S+/" + re.escape(sdist), done.stdout + done.stderr)
    if not urls:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(
            f"--version {version}: pip download found no vllm-ascend {version} ({last})"
        )
    target = cache / sdist
    tmp = target.with_suffix(".part")
    try:
        urllib.request.urlretrieve(urls[0], tmp)
        tmp.replace(target)
    except OSError as exc:
        raise BackendError(f"--version {version}: cannot fetch {urls[0]} ({exc})") from None
    return target


__all__ = [
    "ArchiveCheck",
    "SymbolCheck",
    "check_archive",
    "check_hook",
    "default_cache",
    "download",
    "read_sources",
    "version_of",
]
