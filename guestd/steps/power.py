"""Step power: watch the ACPI power button (an evdev device) and power the guest off when pressed,
so the VMManager's ACPI shutdown works without acpid. Runs in a thread; reports before powering off."""
from __future__ import annotations

import os
import struct
import threading
from pathlib import Path
from typing import Any, Callable

from . import Environment

NAME = "power"
EV_KEY, KEY_POWER = 0x01, 116
EVENT = struct.Struct("llHHi")   # struct input_event: timeval, type, code, value


def power_buttons(env: Environment) -> list[Path]:
    """The /dev/input/event* devices whose name says Power Button."""
    found = []
    inputs = env.roots.sys / "class" / "input"
    for entry in sorted(inputs.glob("event*")) if inputs.is_dir() else []:
        try:
            if "power button" in (entry / "device" / "name").read_text().lower():
                found.append(env.roots.dev / "input" / entry.name)
        except OSError:
            continue
    return found


def wait_for_press(device: Path, stop: threading.Event | None = None) -> bool:
    """Block until KEY_POWER is pressed on ``device`` (True) or the device goes away (False)."""
    fd = os.open(device, os.O_RDONLY)
    try:
        while stop is None or not stop.is_set():
            data = os.read(fd, EVENT.size * 16)
            if not data:
                return False
            for off in range(0, len(data) - EVENT.size + 1, EVENT.size):
                _s, _us, etype, code, value = EVENT.unpack_from(data, off)
                if etype == EV_KEY and code == KEY_POWER and value == 1:
                    return True
        return False
    finally:
        os.close(fd)


def watch(env: Environment, on_press: Callable[[], None]) -> dict[str, Any]:
    """Start one watcher thread per power button; return what is watched."""
    buttons = power_buttons(env)

    def run(device: Path) -> None:
        try:
            if wait_for_press(device):
                on_press()
        except OSError:
            pass

    for device in buttons:
        threading.Thread(target=run, args=(device,), name=f"guestd-power-{device.name}", daemon=True).start()
    return {"buttons": [str(b) for b in buttons]}
