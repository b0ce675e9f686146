"""A write that runs out of disk names the file and says the disk or quota is full; the file's previous version and
the folder are left as they were (no temp file), and other errors pass through unchanged."""
import errno

import pytest

from lowrank.rundir.atomic import DiskFull, write_text, write_with


def failing(error):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise error
    return write


@pytest.mark.parametrize("error,why", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "Disk quota exceeded"),
    # what torch.save's zip writer raises when the disk fills (it reports no errno)
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 1003"), "unexpected pos"),
])
def test_a_full_disk_names_the_file_and_keeps_the_previous_version(tmp_path, error, why):
    path = tmp_path / "checkpoint.pt"
    write_text(path, "previous")
    with pytest.raises(DiskFull) as e:
        write_with(path, failing(error))
    assert str(e.value).startswith(f"[Errno {errno.ENOSPC}] writing {path} failed: the disk or quota is full (")
    assert why in str(e.value) and "previous version, if any, is intact" in str(e.value)
    assert path.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(ValueError, match="not a disk problem"):
        write_with(tmp_path / "x", failing(ValueError("not a disk problem")))
    with pytest.raises(RuntimeError, match="something else"):
        write_with(tmp_path / "x", failing(RuntimeError("something else")))
    assert list(tmp_path.iterdir()) == []
