"""`--shard i/N` splits deterministically, covers everything once, and refuses bad specs."""

from __future__ import annotations

import pytest

from ditf_pipeline.errors import DitfError
from ditf_pipeline.shards import Shard


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_partition_items_and_blocks(count):
    items = list(range(23))
    shards = [Shard(i, count) for i in range(count)]
    chosen = [x for shard in shards for x in shard.select(items)]
    assert sorted(chosen) == items  # every item exactly once
    starts = [s for shard in shards for s in shard.blocks(23, 4)]
    assert sorted(starts) == list(range(0, 23, 4))  # every block exactly once
    assert Shard.parse(f"{count - 1}/{count}").select(items) == shards[-1].select(items)


@pytest.mark.parametrize("text", ["3/3", "-1/4", "1/0", "a/b", "2", "1/2/3", " / "])
def test_bad_shard_specs_are_one_clear_error(text):
    with pytest.raises(DitfError, match="--shard"):
        Shard.parse(text)


def test_no_shard_is_the_whole_dataset():
    assert Shard.parse(None).whole and Shard.parse("0/1").whole
    assert Shard.parse(" 2 / 5 ") == Shard(2, 5)
