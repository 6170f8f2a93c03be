"""The query index saved beside the catalogue (issue 13 §4): a start loads it instead of reading every
fact row, but only when its stamp names a position of this catalogue's change log; the changes after
that position are caught up, and an index from another history, another catalogue or a damaged file
is rebuilt from SQLite. Whatever the path, a query answers exactly what SQLite holds."""
from __future__ import annotations

import random
import shutil
import sqlite3

import pytest
from lxml import etree

from services.descriptor import WS, parse_descriptor, set_field
from services.vmrepository.catalogue import Catalogue, new_image_id
from services.vmrepository.query import Criterion, prepare_groups
from services.vmrepository.store import ImageStore
from tests.fixtures.repository import EXAMPLES

pytestmark = pytest.mark.timeout(120)
VOS = ["bio", "hep"]


def descriptor(name: str, vo: str, memory: int, emboss: str) -> etree._Element:
    ws = parse_descriptor((EXAMPLES / "debian12-emboss.xml").read_bytes())
    set_field(ws, "identity", "name", name)
    set_field(ws, "identity", "imageId", new_image_id())
    set_field(ws, "identity", "owner", "/O=Grid/OU=test/CN=someone")
    set_field(ws, "identity", "created", "2026-11-25T00:00:00Z")
    set_field(ws, "identity", "vo", vo)
    set_field(ws, "hardware", "memory", memory)
    for lib in ws.iterfind(f"{{{WS}}}software/{{{WS}}}librarySignature/{{{WS}}}library"):
        if lib.findtext(f"{{{WS}}}name") == "emboss":
            lib.find(f"{{{WS}}}version").text = emboss
    return ws


def open_catalogue(root) -> Catalogue:
    return Catalogue(root / "catalogue.sqlite", ImageStore(root / "images"))


def seeded(root, n: int = 150, cat: Catalogue | None = None) -> Catalogue:
    cat = cat or open_catalogue(root)
    src = root / "bytes"
    src.write_bytes(b"persisted index")
    ing = cat.store.ingest(src)
    rng = random.Random(13)
    first = descriptor("seed", "bio", 512, "6.6.0")
    set_field(first, "image", "sha256", ing.sha256)
    set_field(first, "image", "size", ing.size)
    cat.add(first, ing)
    batch = []
    for i in range(n - 1):
        ws = descriptor(f"img-{i:04d}", rng.choice(VOS), rng.choice([256, 1024, 4096]),
                        rng.choice(["6.5.7", "6.6.0", "6.10.0"]))
        set_field(ws, "image", "sha256", ing.sha256)
        set_field(ws, "image", "size", ing.size)
        batch.append(ws)
    cat.add_many(batch)
    return cat


QUESTIONS = [
    [[Criterion("ram", ">=", "1024")]],
    [[Criterion("library.emboss", ">=", "6.6"), Criterion("vo", "=", "hep")]],
    [[Criterion("name", "=", "img-0042")], [Criterion("ram", "<", "512")]],
    [],
]


def answers(cat: Catalogue) -> list[tuple[int, list[str]]]:
    out = []
    for groups in QUESTIONS:
        total, page = cat.query(prepare_groups(groups), VOS, "name", False, 0, 1000)
        out.append((total, [r.name for r in page]))
    return out


def truth(cat: Catalogue) -> list[tuple[int, list[str]]]:
    """The same questions answered by an index rebuilt from SQLite alone."""
    fresh = open_catalogue(cat.path.parent)
    fresh.index_path = cat.path.parent / "nowhere.index"      # never the saved file
    try:
        assert fresh.warm().startswith("rebuilt")
        return answers(fresh)
    finally:
        fresh.db.close()


def test_a_start_loads_the_saved_index_and_answers_as_sqlite_does(tmp_path):
    cat = seeded(tmp_path)
    assert cat.warm().startswith("rebuilt (no saved index)")
    expected = answers(cat)
    cat.close()
    assert cat.index_path.is_file()

    again = open_catalogue(tmp_path)
    assert again.warm() == "saved"
    assert answers(again) == expected == truth(again)
    again.close()


def test_changes_after_the_saved_index_are_caught_up(tmp_path):
    """A process killed after writes (its index never saved again): the next start loads the old index
    and replays the change log after it (an add, a replace, a removal)."""
    cat = seeded(tmp_path)
    cat.warm()
    cat.save_index()
    sha = cat.find("bio", "seed").sha256
    new = descriptor("img-added", "hep", 4096, "6.10.0")
    set_field(new, "image", "sha256", sha)
    set_field(new, "image", "size", cat.find("bio", "seed").size)
    cat.add(new)
    changed = cat.find("bio", "seed").element()
    set_field(changed, "hardware", "memory", 256)
    cat.replace(changed, "2026-11-26T00:00:00Z")
    victim = cat.query(prepare_groups([[Criterion("vo", "=", "hep")]]), VOS, "name", False, 0, 1)[1][0]
    cat.remove(victim.image_id)
    cat.db.close()                                       # no close(): the saved index stays the old one

    again = open_catalogue(tmp_path)
    assert again.warm() == "saved+3 changes"
    got = answers(again)
    assert got == truth(again)
    names = {name for _, page in got for name in page}
    assert victim.name not in names
    total, page = again.query(prepare_groups([[Criterion("name", "=", "img-added")]]), VOS, "name", False, 0, 5)
    assert [r.name for r in page] == ["img-added"]
    total, page = again.query(prepare_groups([[Criterion("ram", "<", "512"), Criterion("name", "=", "seed")]]),
                              VOS, "name", False, 0, 5)
    assert total == 1
    again.close()


@pytest.mark.parametrize("damage", ["older-history", "other-catalogue", "truncated", "garbage", "one-byte"])
def test_an_index_that_does_not_match_the_catalogue_is_rebuilt_never_served(tmp_path, damage):
    cat = seeded(tmp_path)
    cat.warm()
    cat.close()
    saved = tmp_path / "saved-index"
    shutil.copy(cat.index_path, saved)
    if damage == "older-history":
        # the catalogue goes back to a backup taken before the index was saved, then lives on
        # differently: the saved index's position now names another change (or none)
        backup = tmp_path / "backup"
        backup.mkdir()
        db = sqlite3.connect(cat.path)
        db.execute("DELETE FROM changes WHERE seq > (SELECT max(seq) - 50 FROM changes)")
        removed = [r[0] for r in db.execute("SELECT image_id FROM images ORDER BY image_id LIMIT 40")]
        db.execute(f"DELETE FROM images WHERE image_id IN ({','.join('?' * len(removed))})", removed)
        db.commit()
        db.close()
        reason = "another history"
    elif damage == "other-catalogue":
        db = sqlite3.connect(cat.path)
        db.execute("UPDATE meta SET value = 'someone-else' WHERE key = 'catalogue_id'")
        db.commit()
        db.close()
        reason = "another catalogue"
    elif damage == "truncated":
        data = cat.index_path.read_bytes()
        cat.index_path.write_bytes(data[:len(data) // 2])
        reason = "unreadable"
    elif damage == "one-byte":
        # one byte of the arrays changed, the length and the header intact: the file's BLAKE3 refuses it
        data = bytearray(cat.index_path.read_bytes())
        data[-100] ^= 0x01
        cat.index_path.write_bytes(bytes(data))
        reason = "unreadable"
    else:
        cat.index_path.write_bytes(b"PK\x03\x04 not an index at all")
        reason = "unreadable"

    again = open_catalogue(tmp_path)
    how = again.warm()
    assert how.startswith("rebuilt") and reason in how, how
    assert answers(again) == truth(again)
    again.close()
    # and the rebuilt index was saved in the old one's place: the next start loads it
    third = open_catalogue(tmp_path)
    assert third.warm() == "saved"
    third.close()


def test_writes_without_a_query_are_in_the_index_saved_at_close(tmp_path):
    """A repository that only registers (a bulk import) and stops: the index it saves is the catalogue's."""
    cat = open_catalogue(tmp_path)
    assert cat.warm().startswith("rebuilt")              # empty; saved at position 0
    seeded(tmp_path, 40, cat)                              # no query in between
    cat.close()
    again = open_catalogue(tmp_path)
    assert again.warm() == "saved"
    assert answers(again) == truth(again) and answers(again)[-1][0] == 40
    again.close()


def test_an_index_far_behind_is_rebuilt_rather_than_replayed(tmp_path, monkeypatch):
    import services.vmrepository.catalogue as catalogue_module

    cat = open_catalogue(tmp_path)
    cat.warm()
    cat.db.close()                                         # killed before saving again
    seeded(tmp_path, 40).db.close()
    monkeypatch.setattr(catalogue_module, "REBUILD_OVER", 10)
    again = open_catalogue(tmp_path)
    assert again.warm() == "rebuilt (saved index 40 changes behind)"
    assert answers(again) == truth(again)
    again.close()


@pytest.mark.parametrize("kind", ["number", "version", "text"])
def test_a_rebuilt_column_is_the_column_built_fact_by_fact(kind):
    """A rebuild builds each field's column from its facts' texts (keys computed once per distinct text,
    texts coded through a dict); the column must be exactly the one built from (slot, key, text) per fact,
    as a catch-up's merge builds it: same sorted keys and texts, same codes per fact."""
    import numpy as np

    from services.descriptor import NUMBER, VERSION, version_key
    from services.vmrepository.index import _Column

    rng = random.Random(13)
    pool = {"number": ["256", "512", "1024", "8192", "4096", "512"],
            "version": ["6.6", "6.6.0", "6.10", "1.0rc1", "1.0.1", "10", "2.a"],
            "text": ["bio", "hep", "Bio", "", "débian", "a b", "bio"]}[kind]
    texts = [rng.choice(pool) for _ in range(500)]
    slots = list(range(500))
    rng.shuffle(slots)
    kind_of = {"number": NUMBER, "version": VERSION, "text": "text"}[kind]
    keys = [float(t) if kind_of == NUMBER else version_key(t) if kind_of == VERSION else t for t in texts]
    by_fact = _Column.build(kind_of == NUMBER, list(zip(slots, keys, texts)))
    rebuilt = _Column.from_texts(kind_of, slots, texts)
    assert rebuilt.numeric == by_fact.numeric
    for name in ("slots", "ukeys", "kcodes", "utexts", "tcodes"):
        assert np.array_equal(np.asarray(getattr(rebuilt, name)), np.asarray(getattr(by_fact, name))), name
    assert len(rebuilt.ukeys) < len(texts)          # distinct keys, each fact coded to its own
    assert [rebuilt.utexts[c] for c in rebuilt.tcodes] == texts


@pytest.mark.parametrize("kind", ["number", "version", "text"])
def test_a_merged_column_is_the_column_built_from_its_live_facts(kind):
    """A catch-up's merge folds the delta into the base by merging sorted unique values (not sorting every fact
    again): the column must be exactly the one built from the live facts, values only dead facts had dropped."""
    import numpy as np

    from services.descriptor import NUMBER, VERSION, version_key
    from services.vmrepository.index import _Column

    rng = random.Random(17)
    pool = {"number": ["256", "512", "1024", "8192", "4096", "3"],
            "version": ["6.6", "6.6.0", "6.10", "1.0rc1", "1.0.1", "10", "2.a"],
            "text": ["bio", "hep", "Bio", "", "débian", "a b", "zz-only-dead"]}[kind]
    kind_of = {"number": NUMBER, "version": VERSION, "text": "text"}[kind]

    def key(t):
        return float(t) if kind_of == NUMBER else version_key(t) if kind_of == VERSION else t

    base = [(slot, rng.choice(pool[:-1])) for slot in range(300)]
    base[7] = (7, pool[-1])                             # the only fact with this value: its slot dies
    delta = [(slot, rng.choice(pool[:-1] + ["new-" + kind if kind == "text" else "77"])) for slot in range(300, 420)]
    alive = np.ones(420, dtype=bool)
    alive[[7, 11, 12, 305]] = False
    col = _Column.build(kind_of == NUMBER, [(s, key(t), t) for s, t in base])
    col.delta = [(s, key(t), t) for s, t in delta]
    merged = col.merged(alive)
    live = [(s, key(t), t) for s, t in base + delta if alive[s]]
    expected = _Column.build(kind_of == NUMBER, live)
    for name in ("slots", "ukeys", "kcodes", "utexts", "tcodes"):
        assert np.array_equal(np.asarray(getattr(merged, name)), np.asarray(getattr(expected, name))), name
    assert pool[-1] not in [str(t) for t in merged.utexts]
