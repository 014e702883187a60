"""Block hashes: the test vectors of docs/hashing.md and the properties routing relies on."""

from kvstore.hashing import block_hashes, extend_block_hashes, hash_block, hash_seed

SEED = hash_seed("test-model")


def test_seed_vectors():
    assert SEED == 0x49E378F4EF3AEE74
    assert hash_seed("test-model", "tenant-a") == 0x2B95074471D52F8C


def test_chain_vectors():
    assert block_hashes(list(range(12)), 4, SEED) == [0xAF43586D00DD89B5, 0x715B857FC7C8EE87, 0x612696150FBA33BB]
    assert block_hashes([0, 1, 2, 3], 4, hash_seed("test-model", "tenant-a")) == [0xBA0DB8FBFDC08A8D]
    assert hash_block(0, [49151, 1, 2, 65535]) == 0xAC09517E9F4941E1


def test_partial_block_is_not_hashed():
    assert len(block_hashes(list(range(11)), 4, SEED)) == 2
    assert block_hashes([1, 2, 3], 4, SEED) == []


def test_hash_names_the_whole_prefix():
    a = block_hashes([9, 9, 9, 9, 1, 2, 3, 4], 4, SEED)
    b = block_hashes([8, 8, 8, 8, 1, 2, 3, 4], 4, SEED)
    assert a[1] != b[1]  # same second block, different history


def test_extend_equals_full_recompute():
    tokens = list(range(100))
    hashes = block_hashes(tokens[:37], 8, SEED)
    assert extend_block_hashes(hashes, tokens, 8, SEED) == block_hashes(tokens, 8, SEED)


def test_salt_separates_tenants():
    tokens = list(range(32))
    assert set(block_hashes(tokens, 16, hash_seed("m", "a"))).isdisjoint(block_hashes(tokens, 16, hash_seed("m", "b")))
