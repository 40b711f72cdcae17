"""gptfast.files: a write killed at any moment leaves the old file whole; unusable folders are found up front."""

import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from gptfast.files import (atomic_savefig, atomic_torch_save, atomic_write, atomic_write_text, check_dir_path,
                           check_writable_dir, removing_new_empty_dirs)

# A child that writes half of a new file's bytes through atomic_write, says so, then waits to be killed.
_HALF_WRITE_CHILD = textwrap.dedent("""
    import sys, time
    from gptfast.files import atomic_write
    with atomic_write(sys.argv[1], "wb") as f:
        f.write(b"N" * 4096)
        f.flush()
        print("half", flush=True)
        time.sleep(60)
        f.write(b"N" * 4096)
""")

# A child that saves a large checkpoint again and again until killed.
_SAVE_LOOP_CHILD = textwrap.dedent("""
    import sys, torch
    from gptfast.files import atomic_torch_save
    state = {"model_state_dict": {"w": torch.arange(4_000_000, dtype=torch.float32)}, "step": 2}
    print("start", flush=True)
    while True:
        atomic_torch_save(state, sys.argv[1])
""")


def _spawn(code: str, path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)


def test_kill_in_the_middle_of_a_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "ckpt.pth"
    target.write_bytes(b"OLD" * 100)
    child = _spawn(_HALF_WRITE_CHILD, target)
    assert child.stdout.readline().strip() == "half"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert target.read_bytes() == b"OLD" * 100


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5, 0.9])
def test_kill_during_repeated_checkpoint_saves_never_leaves_a_broken_file(tmp_path, delay):
    target = tmp_path / "model_and_optimizer.pth"
    atomic_torch_save({"model_state_dict": {"w": torch.zeros(3)}, "step": 1}, target)
    child = _spawn(_SAVE_LOOP_CHILD, target)
    assert child.stdout.readline().strip() == "start"
    try:
        child.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGKILL)
        child.wait()
    state = torch.load(target, weights_only=True)  # complete: either the old or the new checkpoint
    assert state["step"] in (1, 2)
    if state["step"] == 2:
        assert torch.equal(state["model_state_dict"]["w"], torch.arange(4_000_000, dtype=torch.float32))


def test_failed_write_removes_the_temporary_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target, "w") as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


# A child allowed to write files of 20 kB at most that saves bigger ones; it exits as the commands do on an error.
_OVER_THE_SIZE_LIMIT_CHILD = textwrap.dedent("""
    import resource, sys, torch
    from gptfast.errors import run_cli
    from gptfast.files import atomic_torch_save, atomic_write_text
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
    if sys.argv[1].endswith(".pth"):
        sys.exit(run_cli("save", lambda: atomic_torch_save({"w": torch.zeros(100_000)}, sys.argv[1])))
    sys.exit(run_cli("save", lambda: atomic_write_text(sys.argv[1], "x" * 100_000)))
""")


@pytest.mark.parametrize("name", ["model.pth", "metrics.json"])
def test_a_write_over_the_size_limit_names_the_file_and_keeps_the_old_one(tmp_path, name):
    target = tmp_path / name
    target.write_bytes(b"OLD")
    result = subprocess.run([sys.executable, "-c", _OVER_THE_SIZE_LIMIT_CHILD, str(target)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr == f"save: error: could not write {target}: File too large\n", \
        result.stderr
    assert target.read_bytes() == b"OLD" and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_successful_writes_replace_the_file_with_the_usual_mode(tmp_path):
    target = tmp_path / "notes.txt"
    atomic_write_text(target, "héllo\n")
    assert target.read_text(encoding="utf-8") == "héllo\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_replaced_file_keeps_its_permissions_and_the_umask_is_never_changed(tmp_path, monkeypatch):
    """Setting the umask to read it would change it for every thread of the process for that moment."""
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"OLD")
    target.chmod(0o640)
    monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("atomic_write changed the umask"))
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_atomic_savefig_writes_a_png(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    atomic_savefig(fig, tmp_path / "loss.png")
    plt.close(fig)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_atomic_write_rejects_read_modes(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "x", "r"):
            pass


def test_check_writable_dir_creates_missing_folders(tmp_path):
    folder = check_writable_dir(tmp_path / "a" / "b")
    assert folder.is_dir()


def test_check_writable_dir_rejects_a_file_and_a_path_below_a_file(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="out_dir .*is a file"):
        check_writable_dir(blocker)
    with pytest.raises(ValueError, match="--out-dir .*is a file"):
        check_writable_dir(blocker / "sub", name="--out-dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_check_writable_dir_rejects_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="not writable"):
            check_writable_dir(folder)
    finally:
        folder.chmod(0o700)


def test_check_writable_dir_reports_a_refused_write(tmp_path, monkeypatch):
    # Root ignores permission bits, so simulate the refusal the way the OS reports it.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("gptfast.files.tempfile.mkstemp", refuse)
    with pytest.raises(ValueError, match="out_dir .*not writable: Permission denied"):
        check_writable_dir(tmp_path)


def test_a_failed_block_removes_only_the_empty_folders_it_made(tmp_path):
    (tmp_path / "old").mkdir()
    with pytest.raises(KeyboardInterrupt):
        with removing_new_empty_dirs(tmp_path / "old", tmp_path / "a" / "b" / "c", tmp_path / "kept" / "d"):
            check_writable_dir(tmp_path / "a" / "b" / "c")
            check_writable_dir(tmp_path / "kept" / "d")
            (tmp_path / "kept" / "note.txt").write_text("x")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "old"]  # "kept" holds a file; "old" was there
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["note.txt"]
    with removing_new_empty_dirs(tmp_path / "e"):  # a block that succeeds keeps what it made
        (tmp_path / "e").mkdir()
    assert (tmp_path / "e").is_dir()


def test_check_dir_path_refuses_a_file_and_makes_nothing(tmp_path):
    (tmp_path / "f").write_text("x")
    for path in (tmp_path / "f", tmp_path / "f" / "below"):
        with pytest.raises(ValueError, match="--out-dir .* is a file, not a folder"):
            check_dir_path(path, name="--out-dir")
    assert check_dir_path(tmp_path / "new" / "sub") == tmp_path / "new" / "sub"
    assert not (tmp_path / "new").exists()


def test_check_dir_path_refuses_an_empty_path(tmp_path):
    with pytest.raises(ValueError, match="out_dir is empty"):
        check_dir_path("")
