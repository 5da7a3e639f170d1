"""What README.md tells a new user, run as written.

The ```python blocks and the ``vram-residency ...`` commands are read from README.md itself (its
Markdown parsed with markdown-it, the parser rich already brings in), never copied here: an edit
to the README is what these tests run. Each python block runs on the host backend in a temporary
directory with the few names it leaves to the reader (a token file, small real safetensors and
GGUF files, a second manager); paths the README shows (``/models/...``, ``/run/secrets/...``) are
replaced by paths under that directory, and every replacement must find its text, so a README
that changes a path fails here instead of silently running something else. Blocks that need a
GPU or torch/transformers are named in ``COMPILE_ONLY`` with the reason; they are still compiled
and every ``mgr.method(..., kw=...)`` call in them is checked against the real signature, so a
renamed method or keyword fails. Commands run as real processes through the installed console
script; ``serve`` (covered by tests/service) and ``attest`` (it talks to a running worker over
HTTP) are only checked for their subcommand and flags against the real parser.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from markdown_it import MarkdownIt

import vram_residency
from vram_residency import VramManager, check_seal_record
from vram_residency.audit import AuditLog
from vram_residency.cli.main import build_parser
from vram_residency.formats import digest
from vram_residency.testing import flip_bit

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TOKEN = "readme-test-token-0123456789abcdef"


# -- reading the README -----------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    section: str  # the nearest heading above the block
    line: int  # 1-based line of the opening fence
    lang: str
    code: str


def _parse() -> tuple[list[Block], list[str]]:
    """Every fenced block (with its section) and every inline code span of README.md."""
    tokens = MarkdownIt("commonmark").parse(README.read_text(encoding="utf-8"))
    blocks: list[Block] = []
    spans: list[str] = []
    section = ""
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open":
            section = tokens[i + 1].content
        elif tok.type == "fence":
            line = tok.map[0] + 1 if tok.map else 0
            blocks.append(Block(section, line, tok.info.strip(), tok.content))
        elif tok.type == "inline":
            spans.extend(c.content for c in tok.children or [] if c.type == "code_inline")
    return blocks, spans


BLOCKS, SPANS = _parse()
PYTHON = {b.section: b for b in BLOCKS if b.lang == "python"}

# Blocks that cannot run here, and why. They are compiled and API-checked all the same.
COMPILE_ONLY = {
    "Beside an engine you already run": "needs transformers, torch and a CUDA device (.to('cuda:0'))",
    "Several GPUs and tensor parallelism": "needs torch.distributed process groups on every rank "
    "(tests/distributed runs TPModel over gloo)",
}


def test_every_python_block_is_known() -> None:
    """A new block needs a runner or a reason here; two blocks under one heading would hide one."""
    python_blocks = [b for b in BLOCKS if b.lang == "python"]
    assert len(PYTHON) == len(python_blocks), "two ```python blocks share a heading"
    assert set(PYTHON) == set(RUNNERS) | set(COMPILE_ONLY), (
        f"README python blocks {sorted(PYTHON)} vs tested {sorted(set(RUNNERS) | set(COMPILE_ONLY))}"
    )
    assert not set(RUNNERS) & set(COMPILE_ONLY)


# -- checking code that cannot run ------------------------------------------------------------
MANAGER_NAMES = {"mgr", "src_mgr", "dst_mgr", "worker_mgr"}


# Calls in the prose that are the engine's or torch's, not this library's.
NOT_OURS = {"generate", "named_parameters", "model", "serve", "handle.remove"}


def _library_callable(dotted: str) -> tuple[Any, bool] | None:
    """The library object a call names, and whether it is a method taken from its class (its
    ``self`` is then not among the call's arguments). Top-level names are looked up among what
    the package, ``attest``, ``distributed`` and ``backends.cuda`` export; bare method names
    (``seal_file``, ``digest_many``) on VramManager and the Backend interface."""
    import vram_residency.attest as attest
    import vram_residency.backends.cuda as cuda
    import vram_residency.distributed as distributed
    from vram_residency.backends.base import Backend

    head, _, rest = dotted.partition(".")
    for module in (vram_residency, attest, distributed, cuda):
        exported = getattr(module, "__all__", None)
        if exported is not None and head not in exported:
            continue
        obj = getattr(module, head, None)
        if obj is None or inspect.ismodule(obj):
            continue
        if not rest:
            return obj, False
        attr = getattr(obj, rest, None)
        assert attr is not None, f"{dotted}: {head} has no attribute {rest!r}"
        static = inspect.getattr_static(obj, rest) if inspect.isclass(obj) else None
        return attr, inspect.isclass(obj) and not isinstance(static, (classmethod, staticmethod))
    for cls in (VramManager, Backend):
        if not rest and callable(getattr(cls, head, None)):
            return getattr(cls, head), True
    return None


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def check_api(block: Block) -> None:
    """Every call on a manager (``mgr.seal_model(...)``) or on a name the library exports
    (``check_seal_record(...)``, ``TPModel.seal(...)``) names a real callable, with the
    keywords and the number of positional arguments it takes."""
    compile(block.code, f"README.md:{block.line}", "exec")
    checked = 0
    for node in ast.walk(ast.parse(block.code)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        obj, _, method = name.partition(".")
        if obj in MANAGER_NAMES:
            fn = getattr(VramManager, method, None)
            assert fn is not None, f"README.md:{block.line}: VramManager has no method {method!r}"
            found: tuple[Any, bool] | None = (fn, True)
        else:
            found = _library_callable(name)
        if found is None:
            continue
        fn, unbound = found
        sig = inspect.signature(fn)
        args = [None] * (len(node.args) + unbound)
        try:
            sig.bind(*args, **dict.fromkeys(k.arg for k in node.keywords if k.arg is not None))
        except TypeError as exc:
            raise AssertionError(f"README.md:{block.line}: {name}{sig}: {exc}") from None
        checked += 1
    assert checked, f"README.md:{block.line}: no library call found to check"


@pytest.mark.parametrize("section", sorted(PYTHON))
def test_block_compiles_and_calls_real_api(section: str) -> None:
    check_api(PYTHON[section])


@pytest.mark.parametrize("section", sorted(COMPILE_ONLY))
def test_compile_only_blocks_exist(section: str) -> None:
    assert section in PYTHON, f"COMPILE_ONLY names {section!r}, which has no python block in README.md"


def test_calls_in_the_prose_match_the_api() -> None:
    """``verify_before_forward(model, mgr, sealed, every_ms=0)``, ``Scrubber(check="fast")``,
    ``CudaBackend(host_pool_bytes=...)`` and the like: each names a real callable that takes
    those keywords and that many positional arguments (missing ones are allowed: fragments)."""
    checked = 0
    for span in SPANS:
        try:
            tree = ast.parse(span)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            found = _library_callable(name)
            if found is None:
                assert name in NOT_OURS, f"README: {span!r}: {name} is not in the library"
                continue
            fn, unbound = found
            sig = inspect.signature(fn)
            args = [None] * (len(node.args) + unbound)
            kws = dict.fromkeys(k.arg for k in node.keywords if k.arg is not None)
            try:
                sig.bind_partial(*args, **kws)
            except TypeError as exc:
                raise AssertionError(f"README: {span!r}: {name}{sig}: {exc}") from None
            checked += 1
    assert checked >= 5


# -- running the blocks -----------------------------------------------------------------------
def _substitute(code: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in code, f"the README block no longer contains {old!r}: update this test"
        code = code.replace(old, new)
    return code


def _run(block: Block, namespace: dict[str, Any], replacements: dict[str, str]) -> tuple[dict[str, Any], str]:
    code = _substitute(block.code, replacements)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README.md:{block.line}", "exec"), namespace)
    return namespace, out.getvalue()


@pytest.fixture
def host_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``from vram_residency import VramManager`` in a block gets one whose default backend is the
    host emulation, so that the blocks run the same here and on a GPU machine."""

    class HostVramManager(VramManager):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("backend", "host")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(vram_residency, "VramManager", HostVramManager)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _tensors(seed: int, prefix: str = "") -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return {f"{prefix}layer{i}.weight": rng.standard_normal((64, 1024), dtype=np.float32) for i in range(2)}


def _write_safetensors(path: Path, seed: int, prefix: str = "") -> dict[str, np.ndarray[Any, Any]]:
    from safetensors.numpy import save_file

    tensors = _tensors(seed, prefix)
    save_file(tensors, str(path))
    return tensors


def _write_sharded(directory: Path) -> Path:
    """A two-file safetensors checkpoint with its index, as transformers writes one."""
    directory.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for k in (1, 2):
        name = f"model-0000{k}-of-00002.safetensors"
        weight_map.update(dict.fromkeys(_write_safetensors(directory / name, k, f"part{k}."), name))
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def _write_gguf(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for name, arr in _tensors(3).items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _torch_module() -> Any:
    """What ``mgr.seal_tensors(torch_module)`` adopts: a CPU ``nn.Module`` where torch is installed
    (``dev.py test`` installs it), else a mapping of names to numpy arrays, which seal_tensors
    takes as well (DLPack, CPU memory on the host backend)."""
    try:
        import torch
    except ImportError:
        return _tensors(7)
    torch.manual_seed(0)
    return torch.nn.Linear(256, 256)


def run_library(tmp: Path) -> None:
    secrets = tmp / "worker_api_token"
    secrets.write_text(TOKEN + "\n")
    weights = os.urandom(3 << 20)
    served: list[bool] = []
    ns, out = _run(
        PYTHON["Library in 25 lines"],
        {
            "weights": weights,
            "known_digest": digest(weights, "sha256-tree-v1").hex(),
            "torch_module": _torch_module(),
            "serve_requests": lambda: served.append(True),
            "nonce": os.urandom(32),
        },
        {"/run/secrets/worker_api_token": str(secrets)},
    )
    assert out.splitlines()[0] == "host"
    assert served == [True]
    assert ns["token"] == TOKEN
    assert ns["record"]["format"] == "seal-v1"
    assert ns["statement"]["verdict"] == "ok"
    check_seal_record(json.dumps(ns["record"]), TOKEN)  # "dict or JSON text", as the block says
    # The statement covers every seal held: the bytes-sealed shard and the adopted tensors.
    attested = {s["shard_id"] for s in ns["statement"]["shards"]}
    assert attested == {ns["shard"].shard_id, *(s.shard_id for s in ns["model"].shards)}


def run_files(tmp: Path) -> None:
    from vram_residency.sources.manifest import build_manifest, write_manifest

    models = tmp / "models"
    index = _write_sharded(models / "llama-3-8b")
    _write_gguf(models / "tiny.gguf")
    write_manifest(build_manifest([models / "tiny.gguf"]), tmp / "manifest.json")
    with VramManager(TOKEN, backend="host") as mgr:
        ns, _ = _run(
            PYTHON["Sealing what you actually have"],
            {"mgr": mgr, "torch_module": _torch_module()},
            {"/models/": f"{models}/"},
        )
        assert ns["model"].names == tuple(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
        assert ns["report"].repaired_units == 0
        assert len(mgr.shards()) == 2 + 1 + len(ns["adopted"].shards)


def run_attest(tmp: Path) -> None:
    models = tmp / "models"
    models.mkdir()
    _write_safetensors(models / "m.safetensors", seed=5)
    with VramManager(TOKEN, backend="host", worker_id="gpu-node-7") as worker_mgr:
        shard = worker_mgr.seal_file(models / "m.safetensors")
        ns, _ = _run(
            PYTHON["Freshness: attestations an orchestrator can check"],
            {"worker_mgr": worker_mgr, "token": TOKEN, "seal_records": [shard.record()]},
            {'"shard-..."': repr(shard.shard_id), "/models/": f"{models}/"},
        )
    assert (tmp / "nonces.json").exists()
    # check_attestation raised on any failure; a replay of the same nonce is now refused.
    from vram_residency.attest import AttestationRefused, check_attestation

    with pytest.raises(AttestationRefused):
        check_attestation(
            ns["statement"], TOKEN, ns["issued"].nonce, [shard.record()], ns["issued"].issued_at_ns,
            max_delay_ns=2_000_000_000, nonces=ns["nonces"],
        )  # fmt: skip


def run_migration(tmp: Path) -> None:
    with (
        VramManager(TOKEN, device=0, backend="host") as src_mgr,
        VramManager(TOKEN, device=1, backend="host") as dst_mgr,
    ):
        shard = src_mgr.seal_model(os.urandom(2 << 20), model_ref="m")
        ns, _ = _run(
            PYTHON["Moving shards: migration, offload and restore"],
            {"src_mgr": src_mgr, "dst_mgr": dst_mgr, "shard": shard},
            {},
        )
        assert src_mgr.shards() == []
        dst_mgr.verify_sealed(ns["new"])


RUNNERS: dict[str, Callable[[Path], None]] = {
    "Library in 25 lines": run_library,
    "Sealing what you actually have": run_files,
    "Freshness: attestations an orchestrator can check": run_attest,
    "Moving shards: migration, offload and restore": run_migration,
}


@pytest.mark.parametrize("section", sorted(RUNNERS))
@pytest.mark.usefixtures("host_only")
def test_python_block_runs(section: str, workdir: Path) -> None:
    RUNNERS[section](workdir)


# -- the commands -----------------------------------------------------------------------------
def _commands() -> list[str]:
    """Every ``vram-residency ...`` line of a ```sh block and every inline span naming one."""
    found = [
        line.strip()
        for b in BLOCKS
        if b.lang == "sh"
        for line in b.code.splitlines()
        if line.strip().startswith("vram-residency ")
    ]
    for span in SPANS:
        m = re.search(r"vram-residency (?!\.\.\.).*", span)
        if m:
            found.append(m.group(0))
    return found


def _subcommand_options(words: list[str]) -> tuple[list[str], set[str]]:
    """The subcommand path that ``words`` start with (``['audit', 'verify']``) and its options."""
    parser = build_parser()
    path: list[str] = []
    for word in words:
        choices = _choices(parser)
        if word not in choices:
            break
        path.append(word)
        parser = choices[word]
    return path, {s for a in parser._actions for s in a.option_strings}


def _subcommand_choices() -> list[str]:
    """Every subcommand path: ``digest``, ..., ``audit verify``, ``audit show``."""
    out: list[str] = []
    for top in _choices(build_parser()):
        subs = _choices(_choices(build_parser())[top])
        out.extend([f"{top} {s}" for s in subs] or [top])
    return out


def _choices(parser: Any) -> dict[str, Any]:
    subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return dict(subs[0].choices) if subs else {}


def test_every_documented_flag_exists() -> None:
    """Each subcommand and ``--flag`` the README shows (serve and attest included) is one the
    real parser has: ``serve --max-seal-age``, ``audit verify --anchor``, ``--tp-timeout``..."""
    spans = [*_commands()]
    spans += [s for s in SPANS if re.match(r"(serve|audit verify|attest) --", s)]
    spans += [s for s in SPANS if "vram_residency.cli.main serve" in s]
    # A bare ``--flag`` in the prose must be an option of some subcommand.
    every = {o for cmd in _subcommand_choices() for o in _subcommand_options(cmd.split())[1]}
    for flag in (s for s in SPANS if re.fullmatch(r"--[\w-]+", s)):
        assert flag in every, f"README: no vram-residency subcommand has the option {flag}"
    assert len(spans) >= 10
    for text in spans:
        words = shlex.split(text.replace("[", " ").replace("]", " ").replace("|", " "))
        if "vram-residency" in words:
            words = words[words.index("vram-residency") + 1 :]
        elif "vram_residency.cli.main" in words:
            words = words[words.index("vram_residency.cli.main") + 1 :]
        path, options = _subcommand_options(words)
        assert path, f"README: {text!r} names no vram-residency subcommand"
        for w in words:
            if w.startswith("-") and w not in ("-", "--"):
                assert w in options, f"README: {text!r}: {' '.join(path)} has no option {w}"


def _shell(command: str, cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """Run a README command line in bash, as a user would, with the environment's console script
    first on PATH and HOME in the test's directory (for ``~/...`` paths)."""
    bindir = Path(sys.executable).parent
    assert (bindir / "vram-residency").exists(), "the console script is not installed beside python"
    env = dict(
        os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", HOME=str(home), COLUMNS="200"
    )
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def _one(pattern: str) -> str:
    hits = [c for c in _commands() if re.match(pattern, c)]
    assert len(hits) == 1, f"README commands matching {pattern!r}: {hits}"
    return hits[0]


def test_digest_and_manifest_commands(tmp_path: Path) -> None:
    _write_safetensors(tmp_path / "model.safetensors", seed=11)
    data = (tmp_path / "model.safetensors").read_bytes()
    cmd = _one(r"vram-residency digest ")
    out = _shell(cmd, tmp_path, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == digest(data, "sha256-tree-v1").hex()

    cmd = _substitute(_one(r"vram-residency manifest "), {"FILES...": "model.safetensors"})
    out = _shell(cmd, tmp_path, tmp_path)
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert digest(data, "sha256-tree-v1").hex() in json.dumps(manifest)
    # What the README says it is for: seal_file(..., manifest=...) accepts these bytes.
    with VramManager(TOKEN, backend="host") as mgr:
        mgr.seal_file(tmp_path / "model.safetensors", manifest=tmp_path / "manifest.json")
        _write_safetensors(tmp_path / "model.safetensors", seed=12)  # same shape, other bytes
        with pytest.raises(vram_residency.InvalidInput):
            mgr.seal_file(tmp_path / "model.safetensors", manifest=tmp_path / "manifest.json")
        assert mgr.shards() and len(mgr.shards()) == 1  # the refused seal left nothing behind


def test_audit_commands(tmp_path: Path) -> None:
    """The three audit lines, on a real log: the README's default path (under HOME), a head kept
    by an orchestrator as the anchor, and a failed verification to show."""
    state = tmp_path / ".local" / "state" / "vram-residency"
    state.mkdir(parents=True)
    (tmp_path / "TOKEN").write_text(TOKEN + "\n")
    (tmp_path / "TOKEN").chmod(0o600)
    for where in (state, tmp_path):
        with (
            AuditLog(where / "audit.jsonl", token=TOKEN, worker_id="w") as log,
            VramManager(TOKEN, backend="host", worker_id="w", audit=log) as mgr,
        ):
            shard = mgr.seal_model(os.urandom(1 << 20), model_ref="m")
            if where == tmp_path:
                shutil.copy(log.head_path, tmp_path / "head-kept-by-the-orchestrator.json")
            flip_bit(mgr, shard, 8 * 12345 + 3)
            with pytest.raises(vram_residency.SealVerificationFailed):
                mgr.verify_sealed(shard)

    verify_home = _one(r"vram-residency audit verify ~/")
    out = _shell(verify_home, tmp_path, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK" in out.stdout
    assert TOKEN not in out.stdout + out.stderr

    out = _shell(_one(r"vram-residency audit verify audit\.jsonl .*--anchor"), tmp_path, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK" in out.stdout

    out = _shell(_one(r"vram-residency audit show "), tmp_path, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SealVerificationFailed" in out.stdout
    assert "VramSealed" not in out.stdout


def test_attest_fleet_command_fails_on_no_answer(tmp_path: Path) -> None:
    """The fleet line, run as written against workers that do not answer (loopback ports bound
    by this test and never listened on, so the connection is refused at once): one row per
    worker and a non-zero exit, as the README promises for "any failure or late answer". A
    worker that answers is tests/attest/test_attest_http.py's subject (it needs ``serve``)."""
    cmd = _one(r"vram-residency attest --workers-file ")
    (tmp_path / "TOKEN").write_text(TOKEN + "\n")
    (tmp_path / "TOKEN").chmod(0o600)
    with contextlib.ExitStack() as stack:
        urls = []
        for _ in range(2):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            urls.append(f"http://127.0.0.1:{sock.getsockname()[1]}")
        (tmp_path / "fleet.txt").write_text("# two workers\n" + "\n".join(urls) + "\n")
        out = _shell(cmd, tmp_path, tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if "127.0.0.1:" in line]
    assert len(rows) == 2 and all("NO ANSWER" in r for r in rows), out.stdout
    assert TOKEN not in out.stdout + out.stderr


def test_dev_py_commands_exist() -> None:
    """``python3 dev.py serve|test|demo|run`` are not run here: they sync the environment (and
    ``test`` runs the whole suite). What the README promises of them must still hold: ``test``
    and ``run`` are dev.py's own (its help names them), any other word is passed on as a
    ``vram-residency`` subcommand, which must exist."""
    shown = set(re.findall(r"python3 (?:\S*/)?dev\.py (\w+)", README.read_text(encoding="utf-8")))
    assert shown >= {"serve", "test", "demo", "run"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "dev.py"), "--help"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    own = set(re.findall(r"python3 dev\.py (\w+)", out.stdout))
    assert {"test", "run"} <= own
    for cmd in shown - {"test", "run"}:
        path, _ = _subcommand_options([cmd])
        assert path == [cmd], f"python3 dev.py {cmd}: vram-residency has no subcommand {cmd!r}"
