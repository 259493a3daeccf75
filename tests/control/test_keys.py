import subprocess
import sys

from flexkv_runtime.control.keys import BlockKeyer, Namespace


def test_token_keys_are_chained_full_blocks_only():
    keyer = BlockKeyer(Namespace(), tokens_per_block=4)
    keys = keyer.from_token_ids(list(range(10)))
    assert len(keys) == 2  # the partial third block gets no key
    other = keyer.from_token_ids([0, 1, 2, 99, 4, 5, 6, 7])
    assert other[0] != keys[0] and other[1] != keys[1]  # a change in block 0 changes every later key
    same_second_block = keyer.from_token_ids([9, 9, 9, 9, 4, 5, 6, 7])
    assert same_second_block[1] != keys[1]  # equal tokens after a different prefix: different key


def test_token_keys_are_stable_across_processes():
    code = (
        "from flexkv_runtime.control.keys import BlockKeyer, Namespace;"
        "print(BlockKeyer(Namespace('m'), 4).from_token_ids(list(range(12))))"
    )
    here = str(BlockKeyer(Namespace("m"), 4).from_token_ids(list(range(12))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=".").stdout.strip()
    assert out == here


def test_namespaces_never_share_keys():
    a = BlockKeyer(Namespace(model="a"), 4)
    b = BlockKeyer(Namespace(model="b"), 4)
    rank1 = BlockKeyer(Namespace(model="a", tp_rank=1, tp_size=2), 4)
    tokens = list(range(8))
    assert not set(a.from_token_ids(tokens)) & set(b.from_token_ids(tokens))
    assert not set(a.from_hash_ids([1, 2, 3])) & set(b.from_hash_ids([1, 2, 3]))
    assert not set(a.from_block_hashes([b"x", b"y"])) & set(rank1.from_block_hashes([b"x", b"y"]))


def test_hash_ids_and_block_hashes_map_one_to_one():
    keyer = BlockKeyer(Namespace(), 512)
    ids = list(range(5000))
    assert len(set(keyer.from_hash_ids(ids))) == len(ids)
    assert keyer.from_hash_ids([7, 8]) == BlockKeyer(Namespace(), 512).from_hash_ids([7, 8])  # stable
    hashes = [i.to_bytes(32, "big") for i in range(5000)]
    assert len(set(keyer.from_block_hashes(hashes))) == len(hashes)
    assert keyer.from_block_hashes(hashes[:2]) == BlockKeyer(Namespace(), 512).from_block_hashes(hashes[:2])
