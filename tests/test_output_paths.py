"""Output paths: a save replaces only a folder that lorashare wrote, and never destroys anything else.

Every destructive attempt is aimed at a folder under ``tmp_path`` and is followed by a check that
the bytes on disk (files, links, modes) are exactly what they were.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Tuple

import pytest

from lorashare import SHAREModel
from lorashare.cli import main
from lorashare.errors import LoraShareError, OutputPathError, SaveError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree(root: Path) -> Dict[str, Tuple[str, object]]:
    """Everything under ``root`` (itself included): kind and content or link target, and mode."""
    out: Dict[str, Tuple[str, object]] = {}
    paths = [root] + sorted(root.rglob("*")) if root.exists() or root.is_symlink() else []
    for p in paths:
        st = os.lstat(p)
        rel = str(p.relative_to(root)) if p != root else "."
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(p))
        elif stat.S_ISREG(st.st_mode):
            out[rel] = ("file", p.read_bytes(), stat.S_IMODE(st.st_mode))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            out[rel] = ("special", stat.S_IFMT(st.st_mode), st.st_rdev)
    return out


@pytest.fixture()
def ws(adapter_dirs, tmp_path, monkeypatch):
    """A workspace: runs/a, runs/b (copies of real adapters), a file, a foreign folder; cwd = ws/work."""
    root = tmp_path / "ws"
    (root / "runs").mkdir(parents=True)
    for name, src in zip("ab", adapter_dirs):
        shutil.copytree(src, root / "runs" / name)
    (root / "notes.txt").write_text("my notes\n")
    (root / "mydir").mkdir()
    (root / "mydir" / "keep.txt").write_text("keep me\n")
    (root / "work").mkdir()
    home = tmp_path / "home"
    home.mkdir()
    (home / "dotfile").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(root / "work")
    return root


def _ckpt(ws: Path, name: str = "ck") -> Path:
    assert main(["compress", str(ws / "runs/a"), str(ws / "runs/b"), "-o", str(ws / name), "-k", "2", "-q"]) == 0
    return ws / name


def _mkfifo(p: Path) -> None:
    os.mkfifo(p)


def _mknod(p: Path) -> None:
    try:
        os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null twin, inside tmp_path
    except PermissionError:
        pytest.skip("creating a device node needs root")


def _symlink_to_dir(p: Path) -> None:
    p.symlink_to(p.parent / "mydir", target_is_directory=True)


def _git_clone_of_checkpoint(p: Path) -> None:
    shutil.copytree(_ckpt(p.parent, "ck_src"), p)
    (p / ".git").mkdir()
    (p / ".git" / "HEAD").write_text("ref: refs/heads/main\n")


# (id, output relative to the workspace or as given, setup, message fragment, refused even with --overwrite)
COMPRESS_CASES = [
    ("file", "notes.txt", None, "is a file, not a folder", True),
    ("fifo", "pipe", _mkfifo, "is a FIFO, not a folder", True),
    ("device", "null", _mknod, "is a character device, not a folder", True),
    ("symlink", "link", _symlink_to_dir, "is a symlink", True),
    ("foreign folder", "mydir", None, "did not write as a SHARE checkpoint (it has no share_config.json)", False),
    ("checkpoint clone with .git", "clone", _git_clone_of_checkpoint, "it holds '.git'", False),
    ("dot", ".", None, "is the current folder", True),
    ("empty string", "", None, "the path is empty", True),
    ("parent of cwd", "..", None, "is an ancestor of the current folder", True),
    ("root", "/", None, "is an ancestor of the current folder", True),
    ("home", "~", None, "is your home folder", True),
    ("parent of the inputs", "runs", None, "contains the input", True),
    ("an input itself", "runs/a", None, "is the input", True),
]


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("case", COMPRESS_CASES, ids=[c[0] for c in COMPRESS_CASES])
def test_compress_refuses_hostile_outputs(ws, case, overwrite, capsys):
    _id, out, setup, fragment, always = case
    if overwrite and not always:
        pytest.skip("--overwrite replaces this one by design (tested below)")
    if setup is not None:
        setup(ws / out)
    target = out if out in (".", "", "..", "/", "~") else str(ws / out)
    before = tree(ws)
    home_before = tree(Path(os.environ["HOME"]))
    argv = ["compress", str(ws / "runs/a"), str(ws / "runs/b"), "-o", target, "-k", "2", "-q"]
    rc = main(argv + (["--overwrite"] if overwrite else []))
    err = capsys.readouterr().err
    assert rc == 1, err
    assert fragment in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorashare compress: error: will not write")
    assert "Traceback" not in err
    assert tree(ws) == before
    assert tree(Path(os.environ["HOME"])) == home_before


@pytest.mark.parametrize("case", [c for c in COMPRESS_CASES if not c[4]], ids=[c[0] for c in COMPRESS_CASES if not c[4]])
def test_overwrite_replaces_a_foreign_folder(ws, case, capsys):
    _id, out, setup, _fragment, _always = case
    if setup is not None:
        setup(ws / out)
    assert main(["compress", str(ws / "runs/a"), str(ws / "runs/b"), "-o", str(ws / out), "-k", "2", "-q",
                 "--overwrite"]) == 0
    assert sorted(SHAREModel.from_pretrained(ws / out).adapter_names) == ["a", "b"]
    assert not (ws / out / "keep.txt").exists() and not (ws / out / ".git").exists()


def test_refusal_happens_before_the_work(ws, monkeypatch, capsys):
    """A bad -o fails at once: the adapters are not even opened."""
    import lorashare.codec.build as build

    def boom(*a, **k):
        raise AssertionError("compressed although the output is refused")

    monkeypatch.setattr(build, "open_adapters", boom)
    assert main(["compress", str(ws / "runs/a"), str(ws / "runs/b"), "-o", str(ws / "notes.txt")]) == 1
    assert "notes.txt" in capsys.readouterr().err


def test_checkpoint_and_empty_folder_are_replaced(ws, capsys):
    ck = _ckpt(ws)
    first = tree(ck)
    (ws / "empty").mkdir()
    assert main(["compress", str(ws / "runs/a"), str(ws / "runs/b"), "-o", str(ck), "-k", "4", "-q"]) == 0
    assert tree(ck) != first and SHAREModel.from_pretrained(ck).config.num_components == 4
    assert main(["compress", str(ws / "runs/a"), str(ws / "runs/b"), "-o", str(ws / "empty"), "-k", "2", "-q"]) == 0
    assert (ws / "empty" / "share_config.json").is_file()
    # a relative -o under the current folder is fine too
    assert main(["compress", str(ws / "runs/a"), str(ws / "runs/b"), "-o", "sub/ck", "-k", "2", "-q"]) == 0
    assert (ws / "work" / "sub" / "ck" / "share_config.json").is_file()


def test_add_and_remove_save_in_place(ws, adapter_dirs, capsys):
    ck = _ckpt(ws)
    shutil.copytree(adapter_dirs[2], ws / "runs" / "c")
    assert main(["add", str(ck), str(ws / "runs/c"), "-q"]) == 0
    assert main(["remove", str(ck), "a", "-q"]) == 0
    assert sorted(SHAREModel.from_pretrained(ck).adapter_names) == ["b", "c"]


RECONSTRUCT_CASES = [
    ("the checkpoint itself", "store/ck", "is the input", True),
    ("the checkpoint's parent", "store", "contains the input", True),
    ("a file", "notes.txt", "is a file", True),
    ("a user's PEFT adapter", "runs/a", "lorashare did not write as a rebuilt adapter (it holds 'README.md')", False),
    ("a foreign folder", "mydir", "holds 'keep.txt'", False),
]


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("case", RECONSTRUCT_CASES, ids=[c[0] for c in RECONSTRUCT_CASES])
def test_reconstruct_refuses_hostile_outputs(ws, case, overwrite, capsys):
    _id, out, fragment, always = case
    _ckpt(ws, "store/ck")
    capsys.readouterr()
    target = str(ws / out)
    before = tree(ws)
    rc = main(["reconstruct", str(ws / "store/ck"), "--adapter", "a", "-o", target]
              + (["--overwrite"] if overwrite else []))
    err = capsys.readouterr().err
    if overwrite and not always:
        assert rc == 0, err
        assert (Path(target) / "adapter_model.safetensors").is_file() and not (Path(target) / "keep.txt").exists()
        return
    assert rc == 1, err
    assert fragment in err and len(err.strip().splitlines()) == 1
    assert tree(ws) == before


def test_reconstruct_replaces_its_own_output(ws, capsys):
    ck = _ckpt(ws)
    assert main(["reconstruct", str(ck), "--adapter", "a", "-o", str(ws / "rec")]) == 0
    assert main(["reconstruct", str(ck), "--adapter", "b", "-o", str(ws / "rec")]) == 0  # its own: replaced
    assert main(["reconstruct", str(ck), "--all", "-o", str(ws / "all")]) == 0
    assert main(["reconstruct", str(ck), "--all", "-o", str(ws / "all")]) == 0
    assert sorted(os.listdir(ws / "all")) == ["a", "b"]
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(ws / "rec")).peft_type == "LORA"  # still a standard PEFT folder


def test_api_refuses_inputs_and_their_parents(ws):
    share = SHAREModel.from_adapters([str(ws / "runs/a"), str(ws / "runs/b")], num_components=2, progress=False)
    before = tree(ws)
    for target in (ws / "runs", ws / "runs" / "a", ws, ws / "notes.txt"):
        with pytest.raises(OutputPathError) as info:
            share.save_pretrained(target, overwrite=True)
        assert isinstance(info.value, (LoraShareError, FileExistsError)) and info.value.path == str(target)
    share.save_pretrained(ws / "store" / "ck")
    loaded = SHAREModel.from_pretrained(ws / "store" / "ck")
    for target in (ws / "store" / "ck", ws / "store"):
        with pytest.raises(OutputPathError, match="the input"):
            loaded.reconstruct("a", output_dir=target, overwrite=True)
    loaded.save_pretrained(ws / "store" / "ck")  # saving edits back in place is allowed
    with pytest.raises(OutputPathError, match="contains the input"):
        loaded.save_pretrained(ws / "store", overwrite=True)
    assert {k: v for k, v in tree(ws).items() if not k.startswith("store")} == before


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_new_folders_follow_the_umask(ws, umask):
    old = os.umask(umask)
    try:
        share = SHAREModel.from_adapters([str(ws / "runs/a"), str(ws / "runs/b")], num_components=2, progress=False)
        share.save_pretrained(ws / "ck")
        share.reconstruct("a", output_dir=ws / "rec")
    finally:
        os.umask(old)
    for folder in (ws / "ck", ws / "ck" / "adapters" / "a", ws / "rec"):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~umask, folder
    for f in (ws / "ck" / "share_config.json", ws / "rec" / "adapter_model.safetensors"):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o666 & ~umask, f


def test_stale_temporaries_are_cleaned_and_nothing_else(ws):
    ck = _ckpt(ws)
    stale = ws / ".ck.tmp-deadbeef"
    shutil.copytree(ck, stale)  # what a kill after the swap leaves: a whole old checkpoint
    stale_old = ws / ".ck.old-0123abcd"
    stale_old.mkdir()
    (stale_old / "share_config.json").write_text("{}")
    legacy = ws / ".ck.tmp-ab_c12z9"  # mkdtemp's alphabet, from earlier versions
    legacy.mkdir()
    (legacy / "x").write_text("x")
    decoys = {
        ".ck.tmp-deadbeef0": "dir", ".ck.tmp-notours": "dir", ".ck.tmp-feedface": "file", ".other.tmp-deadbeef": "dir",
        "ck.tmp-deadbeef": "dir", ".ck.tmp-cafe0001": "link",
    }
    for name, kind in decoys.items():
        p = ws / name
        if kind == "dir":
            p.mkdir()
            (p / "mine.txt").write_text("not lorashare's")
        elif kind == "file":
            p.write_text("a file")
        else:
            p.symlink_to(ws / "mydir", target_is_directory=True)
    live = ws / ".ck.tmp-0badf00d"  # a save in progress holds its lock
    live.mkdir()
    (live / "partial").write_text("being written")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        before = tree(ws)
        _ckpt(ws)
        after = tree(ws)
    finally:
        os.close(fd)
    gone = {k.split("/")[0] for k in before} - {k.split("/")[0] for k in after}
    assert gone == {".ck.tmp-deadbeef", ".ck.old-0123abcd", ".ck.tmp-ab_c12z9"}
    for name in [*decoys, ".ck.tmp-0badf00d", "mydir"]:
        assert {k: v for k, v in after.items() if k == name or k.startswith(name + "/")} == \
               {k: v for k, v in before.items() if k == name or k.startswith(name + "/")}, name


def _run_cli(args, *, preexec: Callable[[], None] = None, prefix=()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "lorashare", *args], capture_output=True, text=True,
                          preexec_fn=preexec, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


def test_file_size_limit_keeps_the_old_checkpoint(ws):
    """EFBIG under ``ulimit -f``: one line, exit 1, the previous checkpoint intact, no temp left."""
    ck = _ckpt(ws)
    before = tree(ck)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    p = _run_cli(["compress", str(ws / "runs/a"), str(ws / "runs/b"), "-o", str(ck), "-k", "4", "-q"], preexec=limit)
    assert p.returncode == 1, p.stderr
    assert "File too large" in p.stderr and "Nothing was changed there" in p.stderr and "ulimit -f" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert tree(ck) == before
    assert not [n for n in os.listdir(ws) if n.startswith(".ck.")]


def test_permission_denied_is_one_line(ws):
    """EACCES: a read-only folder (as root, with the capability to override permissions dropped)."""
    locked = ws / "locked"
    locked.mkdir(mode=0o555)
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root ignores permissions, and setpriv (util-linux) is not there to drop that")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    p = _run_cli(["compress", str(ws / "runs/a"), str(ws / "runs/b"), "-o", str(locked / "ck"), "-k", "2", "-q"],
                 prefix=prefix)
    assert p.returncode == 1, p.stderr
    assert "Permission denied" in p.stderr and "permissions" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert os.listdir(locked) == []


def test_unwritable_system_parent_is_one_line(ws, capsys):
    """/proc cannot hold new folders: a clean error, nothing else (and nothing is created there)."""
    target = f"/proc/lorashare-test-{os.getpid()}/ck"
    assert main(["compress", str(ws / "runs/a"), str(ws / "runs/b"), "-o", target, "-k", "2", "-q"]) == 1
    err = capsys.readouterr().err
    assert "could not save the SHARE checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(os.path.dirname(target))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_os_errors_at_the_swap_keep_the_old_checkpoint(ws, monkeypatch, code):
    """A failure while flushing (disk full at the last moment) leaves the old checkpoint and no temp."""
    import lorashare.format.atomic as atomic

    ck = _ckpt(ws)
    before = tree(ck)

    def full(root):
        raise OSError(code, os.strerror(code), root)

    monkeypatch.setattr(atomic, "fsync_tree", full)
    share = SHAREModel.from_adapters([str(ws / "runs/a"), str(ws / "runs/b")], num_components=4, progress=False)
    with pytest.raises(SaveError) as info:
        share.save_pretrained(ck)
    assert os.strerror(code) in str(info.value) and isinstance(info.value, OSError)
    assert tree(ck) == before
    assert not [n for n in os.listdir(ws) if n.startswith(".ck.")]


def test_json_error_for_a_refused_output(ws, capsys):
    rc = main(["compress", str(ws / "runs/a"), str(ws / "runs/b"), "-o", str(ws / "notes.txt"), "--json"])
    assert rc == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["type"] == "OutputPathError" and "notes.txt" in payload["error"]
