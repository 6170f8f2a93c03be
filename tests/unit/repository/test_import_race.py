"""An ImportImages batch refused by a name already taken names that descriptor even when the image holding the name
is removed at the same moment: the refused row is named inside the batch's own transaction, so the catalogue it
reads is the one that refused the insert. Before, the name was looked up after the transaction, found nowhere when
it had been removed in between, and the refusal reached the caller as an InternalFault. Real SQLite; the removal is
a second connection's DELETE, made at the moment the refused row is being named."""
from __future__ import annotations

import sqlite3

import pytest

from services.descriptor import set_field
from services.faults import DuplicateName
from tests.unit.repository.test_index_persisted import descriptor, open_catalogue


def _names(cat) -> list[str]:
    return sorted(r[0] for r in cat._db().execute("SELECT name FROM images"))


def test_a_refused_batch_names_the_taken_name_though_its_image_is_removed_meanwhile(tmp_path, monkeypatch):
    cat = open_catalogue(tmp_path)
    src = tmp_path / "bytes"
    src.write_bytes(b"import race")
    ing = cat.store.ingest(src)

    def ws(name):
        w = descriptor(name, "bio", 512, "6.6.0")
        set_field(w, "image", "sha256", ing.sha256)
        set_field(w, "image", "size", ing.size)
        return w

    cat.add(ws("taken"), ing)
    removal = {}
    refuse_first = cat._refuse_first

    def remove_then_name(*args):
        # another writer removes the image holding the name, as a RemoveImage would, while the row is being named
        other = sqlite3.connect(cat.path, timeout=0, isolation_level=None)
        try:
            other.execute("DELETE FROM images WHERE vo = 'bio' AND name = 'taken'")
            removal["result"] = "removed"
        except sqlite3.OperationalError as exc:
            removal["result"] = str(exc)
        finally:
            other.close()
        return refuse_first(*args)

    monkeypatch.setattr(cat, "_refuse_first", remove_then_name)
    with pytest.raises(DuplicateName) as caught:
        cat.add_many([ws("new-1"), ws("taken"), ws("new-2")], check=True)
    assert caught.value.position == "2 (bio/taken)"
    assert removal["result"] == "database is locked"     # the batch's transaction held the write lock meanwhile
    assert _names(cat) == ["taken"]                      # nothing of the batch is left, "new-1" included
    cat.add_many([ws("new-1"), ws("new-2")], check=True)  # and the catalogue takes the next batch
    assert _names(cat) == ["new-1", "new-2", "taken"]
    cat.close()
