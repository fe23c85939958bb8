"""Run a command inside an umockdev test bed (run with Debian's python3 under
umockdev-wrapper; see beds.py). stdin lines: "add FILE" adds the devices of a description
file (udev "add" events), "remove SYSPATH" sends "remove" and drops the device."""

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # noqa: E402


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", action="append", default=[])
    parser.add_argument("--mountinfo")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args()
    bed = UMockdev.Testbed.new()
    root = bed.get_root_dir()
    os.environ["UMOCKDEV_DIR"] = root  # the bed's setenv is not in os.environ (devices.md)
    if args.mountinfo:
        os.makedirs(os.path.join(root, "proc", "self"), exist_ok=True)
        with open(args.mountinfo) as src, open(os.path.join(root, "proc/self/mountinfo"),
                                               "w") as dst:
            dst.write(src.read())
    for path in args.device:
        bed.add_from_file(path)
    child = subprocess.Popen(args.command, stdin=subprocess.DEVNULL,
                             preexec_fn=_die_with_parent)

    def stop(signum, _frame) -> None:  # the test stops us: stop the command too
        child.send_signal(signum)
        code = child.wait()
        shutil.rmtree(root, ignore_errors=True)  # the bed's folder; no slow GLib teardown
        os._exit(code)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    lock = threading.Lock()

    def commands() -> None:
        for line in sys.stdin:
            verb, _, arg = line.strip().partition(" ")
            with lock:
                if verb == "add":
                    bed.add_from_file(arg)
                elif verb == "remove":
                    bed.uevent(arg, "remove")
                    bed.remove_device(arg)

    threading.Thread(target=commands, daemon=True).start()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
