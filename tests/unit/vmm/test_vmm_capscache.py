"""libvirt's QEMU capability cache rewritten for the short guest-CPU check (vmm/capscache.py): the file
transformation, without libvirt. The QEMU tier checks a real root's cache after the node's probe
(tests/vm/test_vmm_contract_qemu.py)."""
from __future__ import annotations

from pathlib import Path

from services.vmmanager.vmm import capscache

CACHE = """<qemuCaps>
  <emulator>/usr/bin/qemu-system-x86_64</emulator>
  <qemuctime>1795758642</qemuctime>
  <qemumoddirmtime>1795758640</qemumoddirmtime>
  <selfctime>1795758639</selfctime>
  <selfvers>9000000</selfvers>
  <flag name='kvm'/>
  <flag name='x86-max-cpu'/>
  <flag name='cpu-unavailable-features'/>
  <flag name='canonical-cpu-features'/>
</qemuCaps>
"""


def cache_root(tmp_path: Path, text: str = CACHE) -> Path:
    d = tmp_path / "cache" / "qemu" / "capabilities"
    d.mkdir(parents=True)
    (d / "926803a9.xml").write_text(text)
    return tmp_path


def test_the_flag_goes_and_the_stamp_becomes_the_storage_modules():
    out = capscache.prefer_x86_cpu_query(CACHE, 1795758640)
    assert "cpu-unavailable-features" not in out
    assert "<selfctime>1795758640</selfctime>" in out
    # everything else as it was
    assert out == CACHE.replace("  <flag name='cpu-unavailable-features'/>\n", "").replace(
        "<selfctime>1795758639</selfctime>", "<selfctime>1795758640</selfctime>")


def test_the_stamp_is_never_lowered_and_may_be_unknown():
    assert "<selfctime>1795758639</selfctime>" in capscache.prefer_x86_cpu_query(CACHE, 1700000000)
    assert "<selfctime>1795758639</selfctime>" in capscache.prefer_x86_cpu_query(CACHE, None)


def test_a_file_without_the_flag_or_the_stamp_is_left_alone():
    done = capscache.prefer_x86_cpu_query(CACHE, 1795758640)
    assert capscache.prefer_x86_cpu_query(done, 1795758641) is None
    assert capscache.prefer_x86_cpu_query("<qemuCaps><flag name='cpu-unavailable-features'/>\n</qemuCaps>", 5) is None


def test_rewrite_changes_each_cache_file_once(tmp_path):
    root = cache_root(tmp_path)
    assert [p.name for p in capscache.rewrite(root, 1795758640)] == ["926803a9.xml"]
    assert "cpu-unavailable-features" not in (root / "cache/qemu/capabilities/926803a9.xml").read_text()
    assert capscache.rewrite(root, 1795758640) == []
    assert [p.name for p in (root / "cache/qemu/capabilities").iterdir()] == ["926803a9.xml"]   # no temporary left


def test_a_root_without_a_cache_has_nothing_to_rewrite(tmp_path):
    assert capscache.cache_files(tmp_path) == []
    assert capscache.rewrite(tmp_path, 1) == []
