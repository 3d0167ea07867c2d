"""triplet.cli.run: what a user's file system or shell does to a script ends in one line, not a traceback."""
import errno
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests.conftest import ROOT, run_script
from triplet.cli import run


@dataclass
class NoOptions:
    pass


def finish(failure, capsys):
    def main(opts):
        raise failure
    with pytest.raises(SystemExit) as exit_info:
        run(main, NoOptions, argv=[])
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("failure, advice", [
    (PermissionError(errno.EACCES, "Permission denied", "/srv/runs/r1/.metrics.json.x.tmp.json"),
     "check its permissions"),
    (FileExistsError(errno.EEXIST, "File exists", "/tmp/afile"), "a file stands where a folder is needed"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/images/0001.jpg"), "the disk is full"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x.onnx"), "read-only"),
])
def test_a_path_the_file_system_refuses_is_one_line_naming_it(failure, advice, capsys):
    status, err = finish(failure, capsys)
    assert status == 2 and err.count("\n") == 1 and failure.filename in err and advice in err
    assert "Traceback" not in err


def test_other_os_errors_are_bugs_and_keep_their_traceback(capsys):
    with pytest.raises(ConnectionResetError):
        finish(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), capsys)
    with pytest.raises(PermissionError):  # no file named: nothing to tell the user to change
        finish(PermissionError(errno.EACCES, "Permission denied"), capsys)


def test_a_failed_atomic_write_names_the_file_asked_for_not_its_temporary(tmp_path, capsys):
    """os.replace onto a folder failed naming ".out.json.x1y2.tmp.json", a file already deleted."""
    from triplet.fileio import write_json

    (tmp_path / "out.json").mkdir()
    status, err = finish_with(lambda: write_json(tmp_path / "out.json", {}), capsys)
    assert status == 2 and f"{tmp_path / 'out.json'}: Is a directory; that is a folder" in err and ".tmp" not in err


def finish_with(action, capsys):
    def main(opts):
        action()
    with pytest.raises(SystemExit) as exit_info:
        run(main, NoOptions, argv=[])
    return exit_info.value.code, capsys.readouterr().err


def test_a_folder_option_that_is_a_file_is_one_line(tmp_path):
    """prepare_data.py --synthetic --data-dir FILE used to end in FileExistsError's traceback."""
    (tmp_path / "afile").write_text("not a folder")
    result = run_script("prepare_data", "--synthetic", "--data-dir", tmp_path / "afile", "--classes", 2,
                        "--per-class", 4, "--synthetic-size", 32, "--workers", 0, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(tmp_path / "afile") in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.skipif(sys.platform == "win32", reason="bash pipelines")
def test_output_piped_into_head_ends_quietly():
    """`search.py ... | head -1` ended in a BrokenPipeError traceback."""
    script = ("from dataclasses import dataclass\nfrom triplet.cli import run\n@dataclass\nclass O:\n    pass\n"
              "def main(opts):\n    for i in range(200000):\n        print('line', i)\nrun(main, O)\n")
    result = subprocess.run(f"{sys.executable} -c \"$SCRIPT\" | head -1; exit ${{PIPESTATUS[0]}}", shell=True,
                            executable="/bin/bash", capture_output=True, text=True, cwd=ROOT, env={"SCRIPT": script,
                                                                                                   "PATH": "/usr/bin:/bin"})
    assert result.stdout == "line 0\n" and result.stderr == "" and result.returncode == 141  # as `yes | head`


# torch's own texts: ATen's alertNotDeterministic and the CUDA caching allocator's OutOfMemoryError
NOT_DETERMINISTIC = ("adaptive_avg_pool2d_backward_cuda does not have a deterministic implementation, but you set "
                     "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this "
                     "operation, or you can use the 'warn_only=True' option, if that's acceptable for your application.")
CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.25 GiB. GPU 0 has a total capacity of 15.77 GiB of which "
            "1.12 GiB is free. Including non-PyTorch memory, this process has 14.64 GiB memory in use. Of the "
            "allocated memory 13.90 GiB is allocated by PyTorch")


@pytest.mark.parametrize("failure, says", [
    (RuntimeError(NOT_DETERMINISTIC), "--deterministic: adaptive_avg_pool2d_backward_cuda has no deterministic"),
    ("cuda-oom", "out of memory (CUDA out of memory. Tried to allocate 2.25 GiB); lower --batch-size"),
    (MemoryError(), "out of memory (MemoryError); lower --batch-size"),
    ("cpu-oom", "DefaultCPUAllocator: can't allocate memory"),
    (RuntimeError("DataLoader worker (pid 7) is killed by signal: Bus error. It is possible that dataloader's "
                  "workers are out of shared memory. Please try to raise your shared memory limit."), "--shm-size"),
    (RuntimeError("DataLoader worker (pid 7) is killed by signal: Killed. "), "for want of host memory"),
    (RuntimeError("unable to open shared memory object </torch_1_2> in read-write mode: Too many open files (24)"),
     "ulimit -n"),
])
def test_running_short_of_memory_or_determinism_is_one_line_naming_the_option(failure, says, capsys):
    import torch

    if failure == "cuda-oom":
        failure = torch.OutOfMemoryError(CUDA_OOM)
    elif failure == "cpu-oom":
        try:
            torch.empty(2**50, dtype=torch.uint8)  # a real allocation failure, 1 PiB
        except RuntimeError as e:
            failure = e
    status, err = finish(failure, capsys)
    assert status == 2 and err.count("\n") == 1 and says in err and "Traceback" not in err


# A fresh, single-threaded process: there a fork is safe, and torch's SIGCHLD handler (the worker is
# its child) reports the signal, as in a training run.
WORKER_DIES = """
import os, signal, sys
from dataclasses import dataclass
from torch.utils.data import DataLoader
from triplet.cli import run

class Dies:
    def __len__(self):
        return 2

    def __getitem__(self, index):
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))

@dataclass
class NoOptions:
    pass

run(lambda opts: list(DataLoader(Dies(), num_workers=1, multiprocessing_context="fork")), NoOptions, argv=[])
"""


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGBUS"), reason="POSIX signals")
@pytest.mark.parametrize("signal_name, status, says", [
    ("SIGBUS", 2, "ran out of shared memory (DataLoader worker (pid"),  # a full /dev/shm ends a worker so
    ("SIGSEGV", 1, "Traceback"),  # a crash is a bug, not a full /dev/shm
])
def test_a_loader_worker_out_of_shared_memory_says_how_to_give_it_more(signal_name, status, says):
    result = subprocess.run([sys.executable, "-c", WORKER_DIES, signal_name], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == status and says in (last if status == 2 else result.stderr), result.stderr
    if status == 2:
        assert "--shm-size" in last and "--workers" in last


@pytest.mark.parametrize("text", ["mat1 and mat2 shapes cannot be multiplied (4x512 and 256x128)",
                                  "DataLoader worker (pid(s) 7) exited unexpectedly",
                                  "DataLoader worker (pid 7) is killed by signal: Segmentation fault. "])
def test_other_runtime_errors_are_bugs_and_keep_their_traceback(text, capsys):
    with pytest.raises(RuntimeError):
        finish(RuntimeError(text), capsys)


@dataclass
class OneOption:
    epochs: int = 1


@pytest.mark.parametrize("argv, says", [(["--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
                                        (["--epoch", "2", "--bogus"], "unrecognized arguments: --bogus")])
def test_a_mistyped_option_is_one_line_not_the_usage_block(argv, says, capsys):
    """argparse printed its whole usage block (15 lines for train.py) before the error."""
    with pytest.raises(SystemExit) as exit_info:
        run(lambda opts: None, OneOption, argv=argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and says in err and "usage:" not in err
