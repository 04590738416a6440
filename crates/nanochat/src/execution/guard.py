# The sandbox's second layer, run by `python3 -I -B -c` before the program, in the same interpreter.
#
# The first layer is the operating system's (namespaces, a private filesystem, resource limits: see
# mod.rs); this one turns what a program under test has no business doing into a clean Python error:
# signalling or starting processes, deleting, renaming or re-permissioning files, leaving its
# directory, exiting before its last line. It is a speed bump, not a wall: a program can undo it
# (ctypes, for one), and the tests check that the first layer holds when it does.
#
# The program is then compiled from program.py (so tracebacks show its lines) and run as __main__.
# It passes only if it runs to its end: SystemExit, even with status 0, is a failure, as in the
# original evaluator, where the check is that the code finished.

import builtins
import faulthandler
import os
import posix
import shutil
import subprocess
import sys

# a crash must end the process with its signal, not a handler's report
faulthandler.disable()


def _refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")

    return refused


_DISABLED = {
    os: [
        # other processes
        "kill", "killpg", "fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp",
        "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
        "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
        "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "setresuid", "setresgid", "_exit",
        # files that are not the program's to change
        "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
        "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chflags", "lchflags", "chroot",
        # its directory
        "chdir", "fchdir",
        "putenv", "unsetenv",
    ],
    shutil: ["rmtree", "move", "chown"],
    subprocess: ["Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"],
}
for _module, _names in _DISABLED.items():
    for _name in _names:
        if hasattr(_module, _name):
            setattr(_module, _name, _refuse(f"{_module.__name__}.{_name}"))
            # `posix` holds the functions `os` re-exports: close that door too
            if _module is os and hasattr(posix, _name):
                setattr(posix, _name, _refuse(f"os.{_name}"))

# modules that exist to inspect or change the machine or the interpreter's limits
for _name in ("resource", "psutil", "tkinter", "ipdb", "joblib"):
    sys.modules[_name] = None

del _module, _names, _name

with open("program.py", encoding="utf-8") as _file:
    _code = compile(_file.read(), "program.py", "exec")
sys.argv = ["program.py"]
try:
    exec(_code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": builtins})
except SystemExit as _exit:
    sys.stderr.write(f"the program exited before its end (exit status {_exit.code!r}): a failure here\n")
    sys.stderr.flush()
    # past the disabled os._exit: the interpreter's own exit with a failing status
    raise SystemExit(1) from None
