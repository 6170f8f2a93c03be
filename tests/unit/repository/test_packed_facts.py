"""Each catalogue row carries its descriptor's facts packed in one column (issue 13 §4): a rebuild of the
query index splits those strings instead of parsing every stored descriptor. An older catalogue (no such
column) is migrated at its start and its rows' facts are stored by the first rebuild; facts packed by another
definition of the fields are dropped. Whatever the path, a query answers what SQLite holds."""
from __future__ import annotations

import sqlite3
import time

import pytest

import services.vmrepository.catalogue as catalogue_module
import services.vmrepository.index as index_module
from services.descriptor import facts, parse_descriptor, set_field
from services.vmrepository.index import pack_facts, unpack_facts
from tests.fixtures.repository import EXAMPLES
from tests.unit.repository.test_index_persisted import answers, descriptor, open_catalogue, seeded, truth

pytestmark = pytest.mark.timeout(120)


def no_xml_facts(monkeypatch):
    """From here on, reading a descriptor's facts from its XML fails the test."""
    def refuse(element):
        raise AssertionError("the index parsed a stored descriptor for its facts")
    monkeypatch.setattr(index_module, "facts", refuse)


def assert_rebuilt_without_xml(tmp_path, monkeypatch, expected) -> None:
    """The catalogue reopened with its saved index gone rebuilds from the stored facts alone (no descriptor
    parsed) and answers as before."""
    no_xml_facts(monkeypatch)
    again = open_catalogue(tmp_path)
    again.index_path.unlink()
    assert again.warm().startswith("rebuilt (no saved index)")
    assert answers(again) == expected
    again.close()


def stored_facts(cat) -> dict[str, str | None]:
    db = sqlite3.connect(cat.path)
    try:
        return dict(db.execute("SELECT image_id, facts FROM images"))
    finally:
        db.close()


def bulk_batch(cat, n: int) -> list:
    """``n`` new descriptors of the seeded image's bytes (a bulk import's batch)."""
    sha, size = cat.find("bio", "seed").sha256, cat.find("bio", "seed").size
    batch = []
    for i in range(n):
        ws = descriptor(f"bulk-{i:03d}", "hep", 8192, "6.10.0")
        set_field(ws, "image", "sha256", sha)
        set_field(ws, "image", "size", size)
        batch.append(ws)
    return batch


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.xml")))
def test_packed_facts_are_the_descriptors_facts(example):
    ws = parse_descriptor((EXAMPLES / example).read_bytes())
    set_field(ws, "identity", "description", "")              # an empty text is a fact too
    packed = pack_facts(ws)
    assert packed is not None and unpack_facts(packed) == facts(ws)


def test_writes_and_the_index_store_the_packed_facts_and_a_rebuild_reads_only_them(tmp_path, monkeypatch):
    """A registration and an update store them with the row; a bulk import leaves them to the index, which
    stores them the first time it reads the rows (here its rebuild at the start)."""
    cat = seeded(tmp_path, 60)
    seed = cat.find("bio", "seed").image_id
    rows = stored_facts(cat)
    assert rows[seed] is not None and [p for i, p in rows.items() if i != seed] == [None] * 59
    changed = cat.find("bio", "img-0007").element()
    set_field(changed, "hardware", "memory", 256)
    cat.replace(changed, "2026-11-26T00:00:00Z")
    assert stored_facts(cat)[changed.findtext("{*}identity/{*}imageId")] is not None
    assert cat.warm().startswith("rebuilt (no saved index)")
    rows = stored_facts(cat)
    assert len(rows) == 60
    for image_id, packed in rows.items():
        assert packed is not None and unpack_facts(packed) == facts(cat.get(image_id).element())
    expected = answers(cat)
    cat.db.close()

    assert_rebuilt_without_xml(tmp_path, monkeypatch, expected)


def test_an_older_catalogue_gains_the_column_and_its_first_rebuild_stores_the_facts(tmp_path, monkeypatch):
    cat = seeded(tmp_path, 50)
    expected = truth(cat)
    cat.db.close()
    db = sqlite3.connect(cat.path)                  # the layout before packed facts: no column, no stamp
    db.execute("ALTER TABLE images DROP COLUMN facts")
    db.execute("DELETE FROM meta WHERE key = 'facts_version'")
    db.commit()
    db.close()

    old = open_catalogue(tmp_path)
    assert set(stored_facts(old).values()) == {None}
    assert old.warm().startswith("rebuilt")
    assert answers(old) == expected
    rows = stored_facts(old)
    assert None not in rows.values()
    for image_id, packed in rows.items():
        assert unpack_facts(packed) == facts(old.get(image_id).element())
    old.close()

    assert_rebuilt_without_xml(tmp_path, monkeypatch, expected)


def test_facts_packed_by_another_definition_are_dropped_with_the_saved_index(tmp_path):
    cat = seeded(tmp_path, 40)
    cat.warm()
    expected = answers(cat)
    cat.close()
    assert cat.index_path.is_file()
    db = sqlite3.connect(cat.path)                  # as another version of the fields would have packed them
    db.execute("UPDATE meta SET value = 'another' WHERE key = 'facts_version'")
    db.execute("UPDATE images SET facts = 'hardware.memory' || char(31) || '1'")
    db.commit()
    db.close()

    again = open_catalogue(tmp_path)
    assert not again.index_path.exists()
    assert again.warm().startswith("rebuilt (no saved index)")
    assert answers(again) == expected == truth(again)
    again.close()


@pytest.mark.parametrize("rebuild_at", [10, 1000])
def test_a_catch_up_after_a_bulk_import_stores_the_packed_facts(tmp_path, monkeypatch, rebuild_at):
    """A bulk import into a running repository: the first query after it reads the new rows (every row at
    once past REBUILD_AT, else into the delta) and stores their packed facts."""
    monkeypatch.setattr(index_module, "REBUILD_AT", rebuild_at)
    monkeypatch.setattr(catalogue_module, "INDEX_IDLE_S", 3600.0)   # the query catches up, not the background thread
    cat = seeded(tmp_path, 20)
    cat.warm()
    first = answers(cat)
    cat.add_many(bulk_batch(cat, 30))
    assert list(stored_facts(cat).values()).count(None) == 30
    got = answers(cat)
    assert got != first and got[-1][0] == 50
    for image_id, packed in stored_facts(cat).items():
        assert packed is not None and unpack_facts(packed) == facts(cat.get(image_id).element())
    assert got == truth(cat)
    cat.close()


def test_a_bulk_import_is_caught_up_in_the_background_and_a_stop_then_only_writes_the_index(tmp_path, monkeypatch):
    """Once imports are quiet, a background thread reads a bulk import's rows into the query index and stores
    their packed facts: neither the next query nor the stop (close, under a supervisor's timeout) does it then."""
    monkeypatch.setattr(catalogue_module, "INDEX_IDLE_S", 0.0)
    cat = seeded(tmp_path, 20)
    assert cat.warm().startswith("rebuilt")
    before = cat.index.last_seq
    cat.add_many(bulk_batch(cat, 30))
    top = cat._db().execute("SELECT max(seq) FROM changes").fetchone()[0]
    deadline = time.monotonic() + 60                    # waiting for the thread, not timing it
    while None in stored_facts(cat).values() and time.monotonic() < deadline:
        time.sleep(0.01)
    for image_id, packed in stored_facts(cat).items():
        assert packed is not None and unpack_facts(packed) == facts(cat.get(image_id).element())
    assert cat.index.last_seq == top > before

    def no_catch_up(*_a):
        raise AssertionError("close() read rows the background catch-up had read")

    monkeypatch.setattr(index_module.QueryIndex, "_load", no_catch_up)
    monkeypatch.setattr(index_module.QueryIndex, "_load_all", no_catch_up)
    got = answers(cat)                                  # the query finds the index current
    assert got[-1][0] == 50
    cat.close()
    monkeypatch.undo()
    again = open_catalogue(tmp_path)
    assert again.warm() == "saved"
    assert answers(again) == got == truth(again)
    again.close()


def test_the_background_catch_up_leaves_an_index_no_start_warmed(tmp_path, monkeypatch):
    """A catalogue whose index was never made current (an in-process bulk load): the thread reads nothing."""
    monkeypatch.setattr(catalogue_module, "INDEX_IDLE_S", 0.0)
    cat = seeded(tmp_path, 20)
    cat._worker.join(timeout=0.5)                      # still waiting for the next import: it is alive
    assert cat.index.last_seq < 0 and list(stored_facts(cat).values()).count(None) == 19
    cat.close()
    assert not cat._worker.is_alive()
