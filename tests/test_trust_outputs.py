"""Trust in what lorashare writes: no output lands inside or around an input, a refusal writes
nothing, every fix a message names exists where it is shown, special files never block a read,
long names save, and the ΔW error is right at any scale.

Destructive attempts aim only at folders under ``tmp_path``; after each refusal every byte under
the workspace and the home folder is hashed and compared with what was there before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import pytest
import torch

from lorashare import SHAREModel
from lorashare.cli import main
from lorashare.codec import subspace as S
from lorashare.errors import (
    ForeignFolderError,
    InvalidNameError,
    LoraShareError,
    OutputPathError,
    StorageRangeError,
)
from lorashare.format.atomic import _sibling_base
from lorashare.utils.names import open_regular

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = "store/deep/ck"
ADAPTERS = ("runs/set/a", "runs/set/b")


def tree_hash(root: Path) -> str:
    """One sha256 over everything under ``root`` (itself included): names, kinds, modes, bytes, link targets."""
    h = hashlib.sha256()
    if not (root.exists() or root.is_symlink()):
        return "absent"
    for p in [root, *sorted(root.rglob("*"))]:
        st = os.lstat(p)
        h.update(str(p.relative_to(root)).encode() + b"\0" + str(stat.S_IFMT(st.st_mode)).encode())
        if stat.S_ISLNK(st.st_mode):
            h.update(os.readlink(p).encode())
        elif stat.S_ISREG(st.st_mode):
            h.update(str(stat.S_IMODE(st.st_mode)).encode() + p.read_bytes())
        elif stat.S_ISDIR(st.st_mode):
            h.update(str(stat.S_IMODE(st.st_mode)).encode())
        h.update(b"\1")
    return h.hexdigest()


@pytest.fixture(scope="module")
def base_ws(adapter_dirs, tmp_path_factory) -> Path:
    """runs/set/{a,b} (copies of real adapters) and store/deep/ck, compressed from them; made once."""
    root = tmp_path_factory.mktemp("trust") / "ws"
    for name, src in zip("ab", adapter_dirs):
        shutil.copytree(src, root / "runs" / "set" / name)
    share = SHAREModel.from_adapters([str(root / p) for p in ADAPTERS], num_components=2, progress=False)
    share.save_pretrained(root / CKPT)
    (root / "notes.txt").write_text("my notes\n")
    (root / "work").mkdir()
    return root


@pytest.fixture()
def ws(base_ws, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the workspace; cwd = ws/work and HOME = a folder of its own."""
    root = tmp_path / "ws"
    shutil.copytree(base_ws, root, symlinks=True)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dotfile").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(root / "work")
    return root


def _state(ws: Path) -> Tuple[str, str]:
    return tree_hash(ws), tree_hash(Path(os.environ["HOME"]))


def _link(to: str) -> Callable[[Path], None]:
    def make(ws: Path) -> None:
        (ws / "link").symlink_to(ws / to, target_is_directory=True)
    return make


# ------------------------------------------------------------------ 1. outputs inside and around inputs
# (id, output relative to the workspace, setup, message fragment, also a refused OUT for reconstruct --all)
CHECKPOINT_CASES: List[Tuple[str, str, Optional[Callable[[Path], None]], str, bool]] = [
    ("the checkpoint itself", CKPT, None, "is the input", True),
    ("its adapters folder", f"{CKPT}/adapters", None, "is inside the input", True),
    ("an adapter's folder", f"{CKPT}/adapters/a", None, "is inside the input", True),
    ("a file inside", f"{CKPT}/share_config.json", None, "is inside the input", True),
    ("a new folder inside", f"{CKPT}/adapters/a/new", None, "is inside the input", True),
    ("the parent", "store/deep", None, "contains the input", False),
    ("the grandparent", "store", None, "contains the input", False),
    ("a symlink resolving inside", "link", _link(f"{CKPT}/adapters"), "is inside the input", True),
    ("a path through a symlink", "link/a", _link(f"{CKPT}/adapters"), "is inside the input", True),
    ("a symlink to the checkpoint", "link", _link(CKPT), "is the input", True),
]
CK_IDS = [c[0] for c in CHECKPOINT_CASES]

ADAPTER_CASES: List[Tuple[str, str, Optional[Callable[[Path], None]], str]] = [
    ("an adapter itself", ADAPTERS[0], None, "is the input"),
    ("a folder inside an adapter", f"{ADAPTERS[0]}/out", None, "is inside the input"),
    ("a file inside an adapter", f"{ADAPTERS[0]}/adapter_config.json", None, "is inside the input"),
    ("the adapters' parent", "runs/set", None, "contains the input"),
    ("the adapters' grandparent", "runs", None, "contains the input"),
    ("a symlink to an adapter", "link", _link(ADAPTERS[0]), "is the input"),
    ("a path through a symlink", "link/out", _link(ADAPTERS[0]), "is inside the input"),
]
AD_IDS = [c[0] for c in ADAPTER_CASES]


def _check_refusal_api(ws: Path, action: Callable[[], None], target: str, fragment: str) -> None:
    before = _state(ws)
    with pytest.raises(OutputPathError) as info:
        action()
    msg = str(info.value)
    assert fragment in msg and msg.startswith("will not write") and "\n" not in msg, msg
    assert info.value.path == target
    assert _state(ws) == before


def _check_refusal_cli(ws: Path, argv: List[str], capsys, fragment: str) -> None:
    capsys.readouterr()
    before = _state(ws)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lorashare {argv[0]}: error: will not write"), err
    assert fragment in err and "Traceback" not in err
    assert _state(ws) == before


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=CK_IDS)
def test_reconstruct_api_refuses_outputs_in_and_around_the_checkpoint(ws, case, overwrite):
    _id, out, setup, fragment, _ = case
    if setup:
        setup(ws)
    share = SHAREModel.from_pretrained(ws / CKPT)
    target = str(ws / out)
    _check_refusal_api(ws, lambda: share.reconstruct("a", output_dir=target, overwrite=overwrite), target, fragment)


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=CK_IDS)
def test_save_pretrained_refuses_outputs_in_and_around_the_checkpoint(ws, case, overwrite):
    _id, out, setup, fragment, _ = case
    if out == CKPT:
        pytest.skip("saving back in place is allowed (test_save_in_place_is_still_allowed)")
    if setup:
        setup(ws)
    if out == "link" and fragment == "is the input":
        fragment = "is a symlink"  # the checkpoint itself, but through a link: never replaced
    share = SHAREModel.from_pretrained(ws / CKPT)
    target = str(ws / out)
    _check_refusal_api(ws, lambda: share.save_pretrained(target, overwrite=overwrite), target, fragment)


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=CK_IDS)
def test_cli_reconstruct_refuses_outputs_in_and_around_the_checkpoint(ws, case, overwrite, capsys):
    _id, out, setup, fragment, _ = case
    if setup:
        setup(ws)
    argv = ["reconstruct", str(ws / CKPT), "--adapter", "a", "-o", str(ws / out)] + (["--overwrite"] * overwrite)
    _check_refusal_cli(ws, argv, capsys, fragment)


ALL_CASES = [c for c in CHECKPOINT_CASES if c[4]]


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("case", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_cli_reconstruct_all_refuses_outputs_in_the_checkpoint(ws, case, overwrite, capsys):
    """``--all -o OUT`` writes OUT/<name>: with OUT in the checkpoint, every one would land inside it."""
    _id, out, setup, _fragment, _ = case
    if setup:
        setup(ws)
    argv = ["reconstruct", str(ws / CKPT), "--all", "-o", str(ws / out)] + (["--overwrite"] * overwrite)
    _check_refusal_cli(ws, argv, capsys, "is inside the input")


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("case", ADAPTER_CASES, ids=AD_IDS)
def test_cli_compress_refuses_outputs_in_and_around_the_adapters(ws, case, overwrite, capsys):
    _id, out, setup, fragment = case
    if setup:
        setup(ws)
    argv = ["compress", *(str(ws / p) for p in ADAPTERS), "-o", str(ws / out), "-k", "2", "-q"]
    _check_refusal_cli(ws, argv + ["--overwrite"] * overwrite, capsys, fragment)


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("case", ADAPTER_CASES, ids=AD_IDS)
def test_save_pretrained_refuses_outputs_in_and_around_the_adapters(ws, case, overwrite):
    _id, out, setup, fragment = case
    if setup:
        setup(ws)
    share = SHAREModel.from_adapters([str(ws / p) for p in ADAPTERS], num_components=2, progress=False)
    target = str(ws / out)
    _check_refusal_api(ws, lambda: share.save_pretrained(target, overwrite=overwrite), target, fragment)


def test_save_in_place_is_still_allowed(ws, capsys):
    share = SHAREModel.from_pretrained(ws / CKPT)
    share.remove_adapter("b")
    share.save_pretrained(ws / CKPT)
    assert SHAREModel.from_pretrained(ws / CKPT).adapter_names == ["a"]
    assert main(["add", str(ws / CKPT), str(ws / ADAPTERS[1]), "-q"]) == 0
    assert sorted(SHAREModel.from_pretrained(ws / CKPT).adapter_names) == ["a", "b"]


def test_reconstruct_all_beside_the_checkpoint_is_fine(ws, capsys):
    """OUT = the checkpoint's parent: OUT/a and OUT/b sit beside it, and the checkpoint is untouched."""
    before = tree_hash(ws / CKPT)
    assert main(["reconstruct", str(ws / CKPT), "--all", "-o", str(ws / "store/deep"), "-q"]) == 0
    assert (ws / "store/deep/a/adapter_model.safetensors").is_file() and (ws / "store/deep/b").is_dir()
    assert tree_hash(ws / CKPT) == before


# ------------------------------------------------------------------ 2. a refusal writes nothing
def _foreign_b(out: Path) -> None:
    (out / "b").mkdir(parents=True)
    (out / "b" / "keep.txt").write_text("mine\n")


def _file_b(out: Path) -> None:
    out.mkdir(parents=True)
    (out / "b").write_text("a file\n")


def _inside_b(out: Path) -> None:
    out.mkdir(parents=True)
    (out / "b").symlink_to(out.parent / CKPT / "adapters", target_is_directory=True)


@pytest.mark.parametrize("setup, fragment", [
    (_foreign_b, "holds 'keep.txt'"), (_file_b, "is a file, not a folder"), (_inside_b, "is inside the input"),
], ids=["foreign folder", "file", "symlink into the checkpoint"])
def test_reconstruct_all_checks_every_target_first(ws, setup, fragment, capsys):
    out = ws / "out"
    setup(out)
    _check_refusal_cli(ws, ["reconstruct", str(ws / CKPT), "--all", "-o", str(out)], capsys, fragment)
    assert not (out / "a").exists()  # the one before the blocked one was not written either


# ------------------------------------------------------------------ 3. every fix named exists where shown
def test_remove_and_add_with_a_stray_file_name_a_fix_that_works(ws, capsys):
    ck = ws / CKPT
    (ck / "notes.txt").write_text("stray\n")
    for argv in (["remove", str(ck), "b"], ["add", str(ck), str(ws / ADAPTERS[1]), "--name", "c"]):
        capsys.readouterr()
        before = _state(ws)
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "it holds 'notes.txt'" in err, err
        assert f"Move that out of {ck}" in err and f"run lorashare {argv[0]} again" in err
        assert "overwrite" not in err and "CLI:" not in err
        assert _state(ws) == before
    # the fix: move the file out, run again
    os.rename(ck / "notes.txt", ws / "notes-moved.txt")
    assert main(["remove", str(ck), "b", "-q"]) == 0
    assert main(["add", str(ck), str(ws / ADAPTERS[1]), "--name", "c", "-q"]) == 0
    assert SHAREModel.from_pretrained(ck).adapter_names == ["a", "c"]


def test_remove_has_no_overwrite_flag(ws, capsys):
    assert main(["remove", str(ws / CKPT), "b", "--overwrite"]) == 2  # so no message may suggest it


@pytest.mark.parametrize("verb", ["compress", "reconstruct"])
def test_foreign_output_in_the_cli_names_overwrite_and_it_works(ws, verb, capsys):
    out = ws / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    argv = (["compress", *(str(ws / p) for p in ADAPTERS), "-k", "2"] if verb == "compress"
            else ["reconstruct", str(ws / CKPT), "--adapter", "a"]) + ["-o", str(out), "-q"]
    before = _state(ws)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "pass --overwrite to replace it" in err and "overwrite=True" not in err and "CLI:" not in err, err
    assert _state(ws) == before
    assert main(argv + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists()


def test_foreign_output_in_python_names_the_keyword_and_it_works(ws):
    out = ws / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    share = SHAREModel.from_pretrained(ws / CKPT)
    with pytest.raises(ForeignFolderError) as info:
        share.save_pretrained(out)
    msg = str(info.value)
    assert "pass overwrite=True" in msg and "--overwrite" not in msg and "CLI:" not in msg
    assert info.value.found == "it has no share_config.json" and msg.startswith(info.value.problem)
    share.save_pretrained(out, overwrite=True)
    assert SHAREModel.from_pretrained(out).adapter_names == ["a", "b"]


def test_invalid_name_fix_per_front(ws, capsys):
    a, b = (str(ws / p) for p in ADAPTERS)
    with pytest.raises(InvalidNameError) as info:
        SHAREModel.from_adapters({"../x": a, "b": b}, num_components=2, progress=False)
    assert "dict {name: path}" in str(info.value) and "--name" not in str(info.value)
    assert main(["compress", "--name", f"../x={a}", "--name", f"b={b}", "-o", str(ws / "o"), "-k", "2"]) == 1
    err = capsys.readouterr().err
    assert "--name NAME=PATH" in err and "dict" not in err, err
    assert main(["compress", "--name", f"x={a}", "--name", f"b={b}", "-o", str(ws / "o"), "-k", "2", "-q"]) == 0
    # reconstruct: the fix is to ask info for the names, and use one
    assert main(["reconstruct", str(ws / CKPT), "--adapter", "../x", "-o", str(ws / "r")]) == 1
    err = capsys.readouterr().err
    assert f"lorashare info {ws / CKPT}" in err and "--name" not in err and "dict" not in err, err
    assert main(["info", str(ws / CKPT), "--json"]) == 0
    names = list(json.loads(capsys.readouterr().out)["adapters"])
    assert main(["reconstruct", str(ws / CKPT), "--adapter", names[0], "-o", str(ws / "r"), "-q"]) == 0


@pytest.mark.parametrize("verb, fragment", [
    ("compress", "Compress with --dtype float32 or --dtype bfloat16"),
    ("add", "compress the adapters again with --dtype float32"),
])
def test_storage_range_fix_per_subcommand(ws, monkeypatch, capsys, verb, fragment):
    problem = "adapter 'a', module q: the loadings exceed float16's range."

    def overflow(*args, **kwargs):
        raise StorageRangeError(f"{problem} Compress with dtype='float32'.", dtype="float16", adapter="a",
                                problem=problem)

    monkeypatch.setattr(SHAREModel, "from_adapters" if verb == "compress" else "add_adapter", overflow)
    argv = (["compress", *(str(ws / p) for p in ADAPTERS), "-o", str(ws / "o")] if verb == "compress"
            else ["add", str(ws / CKPT), str(ws / ADAPTERS[1]), "--name", "c"])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert problem in err and fragment in err and "dtype='float32'" not in err, err


@pytest.mark.parametrize("path", ["lorashare/format/atomic.py", "lorashare/peft/adapters.py", "lorashare/utils/names.py",
                                  "lorashare/cli.py", "lorashare/sync/manifest.py"])
def test_no_mixed_python_and_cli_fix_in_these_modules(path):
    text = Path(ROOT, path).read_text(encoding="utf-8")
    assert "(CLI:" not in text and "or --name name=path" not in text


# ------------------------------------------------------------------ 4. FIFOs and devices never block
def _run_cli(args: List[str], cwd: Path, timeout: float = 60, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorashare", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}, timeout=timeout)


def _fifo(p: Path) -> None:
    p.unlink()
    os.mkfifo(p)


def _to_dev_zero(p: Path) -> None:
    p.unlink()
    p.symlink_to("/dev/zero")


def _folder(p: Path) -> None:
    p.unlink()
    p.mkdir()


@pytest.mark.parametrize("file", ["adapter_config.json", "adapter_model.safetensors"])
@pytest.mark.parametrize("make, kind", [(_fifo, "a FIFO"), (_to_dev_zero, "a character device"),
                                        (_folder, "a folder")], ids=["fifo", "dev-zero", "folder"])
def test_special_files_in_an_adapter_are_refused_without_blocking(ws, file, make, kind):
    bad = ws / "runs" / "bad"
    shutil.copytree(ws / ADAPTERS[0], bad)
    make(bad / file)
    before = _state(ws)
    p = _run_cli(["compress", str(bad), str(ws / ADAPTERS[1]), "-o", str(ws / "out"), "-k", "2", "-q"], cwd=ws)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "adapter 'bad'" in lines[0] and str(bad / file) in lines[0], p.stderr
    assert f"{kind}, not a regular file" in lines[0]
    assert _state(ws) == before and not (ws / "out").exists()


def test_fingerprint_of_a_fifo_is_refused_without_blocking(ws):
    os.mkfifo(ws / "pipe")
    code = ("import sys\nfrom lorashare.peft.adapters import file_sha256\ntry:\n    file_sha256(sys.argv[1])\n"
            "except OSError as exc:\n    print(exc.strerror)\n")
    p = subprocess.run([sys.executable, "-c", code, str(ws / "pipe")], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert p.stdout.strip() == "it is a FIFO, not a regular file", p.stderr


def _zero_device(p: Path) -> None:
    """A /dev/zero twin inside the workspace (a link to /dev/zero would be refused as outside it)."""
    try:
        os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 5))
    except PermissionError:
        pytest.skip("creating a device node needs root")


@pytest.mark.parametrize("make, kind", [(os.mkfifo, "a FIFO"), (_zero_device, "a character device")],
                         ids=["fifo", "zero-device"])
def test_a_special_manifest_is_refused_without_blocking(ws, make, kind):
    make(ws / "lorashare.yaml")
    p = _run_cli(["sync", "--config", str(ws / "lorashare.yaml"), "--dry-run"], cwd=ws,
                 env={"GITHUB_WORKSPACE": str(ws)})
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "lorashare.yaml" in lines[0] and f"{kind}, not a regular file" in lines[0], p.stderr


def test_open_regular_reads_regular_files_and_links_to_them(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    (tmp_path / "l").symlink_to(tmp_path / "f")  # the Hub cache is made of such links
    for name in ("f", "l"):
        with open_regular(tmp_path / name) as f:
            assert f.read() == b"abc"
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "missing")


# ------------------------------------------------------------------ 5. long output names
LONG_NAMES = [
    ("ascii-200", "n" * 200), ("ascii-241", "n" * 241), ("ascii-242", "n" * 242), ("ascii-245", "n" * 245),
    ("ascii-255", "n" * 255), ("utf8-2byte-244", "é" * 122), ("utf8-2byte-255", "x" + "é" * 127),
    ("utf8-3byte-255", "日" * 85), ("utf8-4byte-252", "🙂" * 63), ("utf8-mixed-254", "a" + "é" * 2 + "日" * 83),
]


@pytest.mark.parametrize("name", [n for _, n in LONG_NAMES], ids=[i for i, _ in LONG_NAMES])
def test_long_output_names_save(ws, name):
    assert 200 <= len(name.encode()) <= 255
    short = _sibling_base(name)
    assert len((f".{short}.tmp-deadbeef").encode()) <= 255 and short == _sibling_base(name)
    share = SHAREModel.from_pretrained(ws / CKPT)
    out = ws / "long"
    out.mkdir()
    share.save_pretrained(out / name)
    share.save_pretrained(out / name)  # again: the swap of an existing folder uses the .old sibling's name too
    share.reconstruct("a", output_dir=out / (name[:-1] + "r"))
    assert sorted(os.listdir(out)) == sorted([name, name[:-1] + "r"])  # no temporary left behind
    assert SHAREModel.from_pretrained(out / name).adapter_names == ["a", "b"]


@pytest.mark.parametrize("name", ["n" * 245, "日" * 85], ids=["ascii-245", "utf8-255"])
def test_stale_temporaries_of_long_names_are_cleaned_and_nothing_else(ws, name):
    import fcntl

    out = ws / "long"
    out.mkdir()
    short = _sibling_base(name)
    assert short != name and short.encode().decode("utf-8") == short  # cut at a character, never mid-way
    stale, decoy, live = out / f".{short}.tmp-deadbeef", out / f".{short}.tmp-notours", out / f".{short}.old-0badf00d"
    for p in (stale, decoy, live):
        p.mkdir()
        (p / "x").write_text("x")
    other = out / f".{_sibling_base('m' * 245)}.tmp-deadbeef"  # another target's: not this save's to clean
    other.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a save in progress
    try:
        SHAREModel.from_pretrained(ws / CKPT).save_pretrained(out / name)
    finally:
        os.close(fd)
    assert not stale.exists() and decoy.exists() and live.exists() and other.exists()
    assert (out / name / "share_config.json").is_file()


# ------------------------------------------------------------------ 6. ΔW error at any scale
def _dense_rel_error(A, B, A_hat, B_hat) -> float:
    """The oracle: ‖BA − B̂Â‖/‖BA‖ on dense float64 products of the very values given."""
    W, W_hat = B.double() @ A.double(), B_hat.double() @ A_hat.double()
    return float((W - W_hat).norm() / W.norm())


def _factors(scale_a: float, scale_b: float, noise: float = 1e-4, batch: Tuple[int, ...] = ()):
    g = torch.Generator().manual_seed(0)
    r, d_in, d_out = 4, 64, 48
    A = torch.randn(*batch, r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(*batch, d_out, r, generator=g, dtype=torch.float64)
    A_hat = A + noise * torch.randn(A.shape, generator=g, dtype=torch.float64)
    B_hat = B + noise * torch.randn(B.shape, generator=g, dtype=torch.float64)
    return [(x * s).float() for x, s in ((A, scale_a), (B, scale_b), (A_hat, scale_a), (B_hat, scale_b))]


SCALES = [1e-40, 1e-20, 1.0, 1e20]


@pytest.mark.parametrize("scale_b", SCALES, ids=[f"B{s:g}" for s in SCALES])
@pytest.mark.parametrize("scale_a", SCALES, ids=[f"A{s:g}" for s in SCALES])
def test_delta_w_error_matches_a_dense_float64_oracle_at_any_scale(scale_a, scale_b):
    A, B, A_hat, B_hat = _factors(scale_a, scale_b)
    want = _dense_rel_error(A, B, A_hat, B_hat)
    assert 5e-5 < want < 1e-3  # the oracle itself sees the error (float32 subnormals keep ~5 digits)
    err, orig = S.delta_w_error(A, B, A_hat, B_hat)
    got = float((err / orig).sqrt())
    assert got == pytest.approx(want, rel=1e-3), (scale_a, scale_b)
    exact, _ = S.delta_w_error(A, B, A, B)
    assert float(exact) == 0.0  # a lossless rebuild is measured as lossless at every scale


def test_delta_w_error_is_batched_with_mixed_scales():
    parts = [_factors(s, s) for s in SCALES]
    A, B, A_hat, B_hat = (torch.stack([p[i] for p in parts]) for i in range(4))
    err, orig = S.delta_w_error(A, B, A_hat, B_hat)
    assert err.shape == (len(SCALES),)
    for i, p in enumerate(parts):
        assert float((err[i] / orig[i]).sqrt()) == pytest.approx(_dense_rel_error(*p), rel=1e-3), SCALES[i]


def test_delta_w_error_rows_ignores_grams_that_underflowed():
    A, B, A_hat, B_hat = _factors(1e-40, 1e-40)
    FB, FB_hat = B.T.contiguous(), B_hat.T.contiguous()
    GA, GB = (A @ A.T).double(), (FB @ FB.T).double()  # float32 products of subnormals: all 0
    assert float(GA.abs().max()) == 0.0
    err, orig = S.delta_w_error_rows(A, FB, A_hat, FB_hat, GA, GB)
    assert float((err / orig).sqrt()) == pytest.approx(_dense_rel_error(A, B, A_hat, B_hat), rel=1e-3)


def test_delta_w_error_of_float64_factors_below_float32_range():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, 32, generator=g, dtype=torch.float64) * 1e-60, torch.randn(24, 4, generator=g, dtype=torch.float64)
    A_hat = A * (1 + 1e-3 * torch.randn(A.shape, generator=g, dtype=torch.float64))
    err, orig = S.delta_w_error(A, B, A_hat, B)
    assert float((err / orig).sqrt()) == pytest.approx(_dense_rel_error(A, B, A_hat, B), rel=1e-3)


def test_error_types_are_lorashare_errors():
    for cls in (ForeignFolderError, StorageRangeError):
        assert issubclass(cls, LoraShareError)
    assert issubclass(ForeignFolderError, FileExistsError) and issubclass(StorageRangeError, ValueError)
