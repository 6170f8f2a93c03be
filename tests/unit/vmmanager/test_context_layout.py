"""The node writes each instance's context image from a layout made once per length of context.json
(services/vmmanager/context.py): instances whose contexts are as long as each other's each get an image that
carries their own context (guestd's reader, and isoinfo, an independent one), and pycdlib lays out an image
once per length, not once per instance."""
from __future__ import annotations

import shutil
import subprocess


from guestd.context import VOLUME_LABEL, loads
from guestd.sources import iso9660
from services.vmmanager import context as ctxmod
from services.vmmanager.context import build_context, write_context_iso


def _context(n: int):
    # the same length for every n < 10: one layout serves them all
    return build_context(instance=f"inst-{n}", hostname=f"node{n}", mac=f"52:54:00:aa:bb:0{n}",
                         address=f"10.1.0.{n + 10}", netmask="255.255.255.0", gateway="10.1.0.1",
                         dns=["10.1.0.2"], container_command=["/opt/gt4/bin/container"], now=1_700_000_000.5)


def test_instances_of_one_context_length_each_get_their_own_context(tmp_path, monkeypatch):
    made = []
    real = ctxmod._pycdlib_image
    monkeypatch.setattr(ctxmod, "_pycdlib_image", lambda body: made.append(len(body)) or real(body))
    monkeypatch.setattr(ctxmod, "_LAYOUTS", type(ctxmod._LAYOUTS)())
    contexts = [_context(n) for n in range(6)]
    assert len({len(c.to_json()) for c in contexts}) == 1
    images = [write_context_iso(c, tmp_path / f"{n}.iso", refresh_time=False) for n, c in enumerate(contexts)]
    assert len(made) == 1                                  # laid out once, for the one length
    for c, image in zip(contexts, images):
        with open(image, "rb") as f:
            assert iso9660.volume_label(f) == VOLUME_LABEL
            assert loads(iso9660.read_file(f, "context.json")) == c
    assert len({image.read_bytes() for image in images}) == len(images)
    if shutil.which("isoinfo"):
        for c, image in zip(contexts, images):
            for names in (["-J"], ["-R"]):
                body = subprocess.run(["isoinfo", *names, "-x", "/context.json", "-i", str(image)],
                                      capture_output=True, check=True).stdout
                assert body == c.to_json()


def test_a_context_of_another_length_gets_a_layout_of_its_own(tmp_path):
    short, long_ = _context(1), build_context(
        instance="inst-" + "x" * 50, hostname="node1", mac="52:54:00:aa:bb:01", address="10.1.0.11",
        netmask="255.255.255.0", container_command=["/opt/gt4/bin/container", "--with", "more"] * 20)
    assert len(short.to_json()) != len(long_.to_json())
    for n, c in enumerate((short, long_, short)):
        with open(write_context_iso(c, tmp_path / f"{n}.iso", refresh_time=False), "rb") as f:
            assert loads(iso9660.read_file(f, "context.json")) == c
